"""Host-side request state and the client's stream handle."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from jdisagg.executors import SamplingRow
from jdisagg.outputs import FinishReason, Output, RequestMetrics, StreamChunk, TopLogprobs
from jdisagg.sampling_params import SamplingParams


class Stage(StrEnum):
    """Where a request is (``jdisagg.scheduler`` moves it)."""

    WAITING = "waiting"
    PREFILLING = "prefilling"
    PREFILLING_LOCAL = "prefilling_local"  # prefilled in chunks on its decode replica, no hand-off
    TRANSFERRING = "transferring"
    READY = "ready"  # KV inserted on its decode replica, waiting for a batch slot
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Request:
    """One generation request as it moves through the stages.

    ``output_ids`` only grows; on preemption the request is prefilled again from ``all_ids`` and continues.
    ``cancel`` is set by the scheduler (client abort, stop string found, shutdown); the stage that next
    touches the request ends it.
    """

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingRow
    stream: RequestStream
    metrics: RequestMetrics
    forced_ids: list[int] = field(default_factory=list)  # a continuation to score instead of sampling
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # only when ``params.logprobs > 0``
    cancel: FinishReason | None = None
    error_code: str = "INTERNAL"  # the gRPC status a failure maps to (UNAVAILABLE: a worker was lost)
    stage: Stage = Stage.WAITING
    replica: int | None = None  # the decode replica its KV goes to / lives on, from prefill to the end
    cached_tokens: int = 0  # tokens of ``all_ids`` whose KV it found cached on ``replica`` when scheduled
    prefilled: int = 0  # tokens whose KV is in its pages while it is prefilled locally
    page_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full pages so far

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def next_forced(self) -> int:
        """The token the next step must take (teacher forcing), or -1 to sample."""
        n = len(self.output_ids)
        return self.forced_ids[n] if n < len(self.forced_ids) else -1


class RequestStream:
    """What ``Engine.submit`` returns: iterate for chunks, ``result()`` for the final ``Output``."""

    def __init__(self, request_id: str, canceller: Callable[[str], bool]) -> None:
        self.request_id = request_id
        self._chunks: queue.Queue[StreamChunk] = queue.Queue()
        self._cancel = canceller
        self._done = threading.Event()
        self._output: Output | None = None

    def deliver(self, chunk: StreamChunk) -> None:
        """The engine's side: a new chunk for the client."""
        self._chunks.put(chunk)

    def complete(self, output: Output) -> None:
        """The engine's side: the final output (delivered before the stream's last chunk)."""
        self._output = output
        self._done.set()

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            chunk = self._chunks.get()
            yield chunk
            if chunk.finish_reason is not None:
                return

    def next_chunk(self, timeout: float | None = None) -> StreamChunk:
        """The next chunk; ``queue.Empty`` after ``timeout`` seconds."""
        return self._chunks.get(timeout=timeout)

    def cancel(self) -> bool:
        """Abort the request: its pages are freed and the stream ends with ``FinishReason.ABORT``."""
        return self._cancel(self.request_id)

    def result(self, timeout: float | None = None) -> Output:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._output is not None
        return self._output
