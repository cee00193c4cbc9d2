from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SettingsRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class Settings(_message.Message):
    __slots__ = ("model", "page_size", "num_pages", "max_context", "max_batch", "attention_backend", "tp", "offer_timeout_s", "prefix_cache", "local_chunk")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    OFFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    num_pages: int
    max_context: int
    max_batch: int
    attention_backend: str
    tp: int
    offer_timeout_s: float
    prefix_cache: bool
    local_chunk: int
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., num_pages: _Optional[int] = ..., max_context: _Optional[int] = ..., max_batch: _Optional[int] = ..., attention_backend: _Optional[str] = ..., tp: _Optional[int] = ..., offer_timeout_s: _Optional[float] = ..., prefix_cache: _Optional[bool] = ..., local_chunk: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("role", "address", "fingerprint", "device", "pid")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    role: str
    address: str
    fingerprint: str
    device: str
    pid: int
    def __init__(self, role: _Optional[str] = ..., address: _Optional[str] = ..., fingerprint: _Optional[str] = ..., device: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("slot", "lease")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    slot: int
    lease: int
    def __init__(self, slot: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("role", "slot", "lease")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    role: str
    slot: int
    lease: int
    def __init__(self, role: _Optional[str] = ..., slot: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class CheckInReply(_message.Message):
    __slots__ = ("registered",)
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    registered: bool
    def __init__(self, registered: _Optional[bool] = ...) -> None: ...

class SamplingRow(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "num_top")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_top: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., num_top: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("shape", "dtype", "num_shards", "checksums", "num_pieces", "last_piece_tokens")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    NUM_PIECES_FIELD_NUMBER: _ClassVar[int]
    LAST_PIECE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_shards: int
    checksums: _containers.RepeatedScalarFieldContainer[float]
    num_pieces: int
    last_piece_tokens: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_shards: _Optional[int] = ..., checksums: _Optional[_Iterable[float]] = ..., num_pieces: _Optional[int] = ..., last_piece_tokens: _Optional[int] = ...) -> None: ...

class KVOffer(_message.Message):
    __slots__ = ("transfer_address", "uuid", "layout")
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    transfer_address: str
    uuid: int
    layout: KVLayout
    def __init__(self, transfer_address: _Optional[str] = ..., uuid: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("token_ids", "sampling", "forced", "cached_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingRow
    forced: int
    cached_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingRow, _Mapping]] = ..., forced: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("token", "logprob", "offer", "top_ids", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    offer: KVOffer
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., offer: _Optional[_Union[KVOffer, _Mapping]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("offer", "prompt_tokens", "cached_tokens")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    offer: KVOffer
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, offer: _Optional[_Union[KVOffer, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class StagedKV(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("staged", "bytes", "seconds")
    STAGED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    staged: StagedKV
    bytes: int
    seconds: float
    def __init__(self, staged: _Optional[_Union[StagedKV, _Mapping]] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class InsertRequest(_message.Message):
    __slots__ = ("staged", "pages")
    STAGED_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    staged: StagedKV
    pages: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, staged: _Optional[_Union[StagedKV, _Mapping]] = ..., pages: _Optional[_Iterable[int]] = ...) -> None: ...

class LocalChunk(_message.Message):
    __slots__ = ("token_ids", "start", "pages", "sampling", "forced")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    start: int
    pages: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingRow
    forced: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., pages: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingRow, _Mapping]] = ..., forced: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("tokens", "positions", "page_counts", "page_ids", "sampling", "forced", "chunks")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PAGE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    page_counts: _containers.RepeatedScalarFieldContainer[int]
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _containers.RepeatedCompositeFieldContainer[SamplingRow]
    forced: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedCompositeFieldContainer[LocalChunk]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., page_counts: _Optional[_Iterable[int]] = ..., page_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Iterable[_Union[SamplingRow, _Mapping]]] = ..., forced: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[_Union[LocalChunk, _Mapping]]] = ...) -> None: ...

class SampledRows(_message.Message):
    __slots__ = ("tokens", "logprobs", "top_ids", "top_logprobs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("tokens", "logprobs", "top_ids", "top_logprobs", "chunks")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    chunks: SampledRows
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., chunks: _Optional[_Union[SampledRows, _Mapping]] = ...) -> None: ...
