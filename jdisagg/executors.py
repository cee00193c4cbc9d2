"""The contract between the engine and the replicas that run its programs, as typed Protocols.

The engine never looks inside a replica: it asks a prefill executor for first tokens and KV hand-offs, and a
decode executor to receive, insert and step. In-process replicas (``jdisagg.replicas``) run compiled
programs on their own meshes; worker proxies (``jdisagg.workers.remote``) make each call an RPC to another
process. Both satisfy these Protocols, so the same scheduler and stage threads drive either.

The KV transport hides behind the hand-off value: prefill returns an opaque *offer* (device arrays in
process, a ``jax.experimental.transfer`` offer across processes); the decode executor's ``receive`` pulls
it onto its own devices (``jax.device_put`` resharding, or a pull from the prefill worker) and returns an
opaque *staged* value that ``insert`` writes into pages or ``discard`` drops.

This module imports no JAX: it is shared by host-side request state and the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

CompileTask = tuple[str, Callable[[], None]]  # (what, compile it): run once each at start-up


@dataclass(frozen=True)
class SamplingRow:
    """The device-side sampling inputs of one sequence."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    num_top: int = 0  # most likely alternatives to return per token (0: none)


@dataclass(frozen=True)
class PromptInput:
    """One prompt of a prefill call: its tokens, how to sample its first token, and a token to force
    instead (``forced >= 0``, scoring a given continuation)."""

    token_ids: Sequence[int]
    sampling: SamplingRow
    forced: int = -1
    # A multiple of the page size, below len(token_ids): the decode replica already holds the KV of
    # token_ids[:cached_tokens], so the offer carries only the KV of the rest (the prefill itself starts
    # where the prefill replica's own cache ends, jdisagg.prefill_cache: the decode pages are not here).
    cached_tokens: int = 0


@dataclass(frozen=True)
class LocalChunk:
    """One piece of a prompt prefilled on the decode replica itself (``DecodeExecutor.prefill_local``).

    Why on the decode replica: its pages already hold the prompt's cached prefix, which the prefill mesh
    does not have; a short uncached suffix is cheaper to compute there than to prefill and hand off."""

    token_ids: Sequence[int]  # this chunk's tokens (at most the replica's ``local_chunk``)
    start: int  # position of token_ids[0]; the KV of positions [0, start) is already in ``pages``
    pages: Sequence[int]  # the sequence's whole page list so far (covers start + len(token_ids) tokens)
    sampling: SamplingRow
    forced: int = -1


class Sampled(NamedTuple):
    """What sampling returns per row: the token, its logprob, and the most likely alternatives. Device
    arrays while a step is in flight, numpy arrays once collected."""

    tokens: Any  # [B] int32
    logprobs: Any  # [B] float32, of the unscaled model distribution
    top_ids: Any  # [B, TOP_LOGPROBS] int32, most likely first (zeros when no row asked)
    top_logprobs: Any  # [B, TOP_LOGPROBS] float32


class Executor(Protocol):
    index: int

    @property
    def alive(self) -> bool:
        """False while a remote worker is down: the engine routes nothing to it."""
        ...

    def compile_tasks(self) -> list[CompileTask]: ...


class PrefillExecutor(Executor, Protocol):
    def run_batch(self, prompts: Sequence[PromptInput]) -> list[tuple[Sampled, Any]]:
        """Prefill ``prompts`` (one call, or as few as the executor can); per prompt, its first token
        (one row, possibly still on device) and its KV offer."""
        ...


class DecodeExecutor(Executor, Protocol):
    overlaps: bool  # True: ``dispatch`` returns before the step has run, so a next step may queue behind it
    num_pages: int  # KV pages in its pools, the scratch page included
    local_chunk: int  # most tokens per LocalChunk; 0: this executor cannot prefill locally (no programs)

    def receive(self, offer: Any) -> tuple[Any, int]:
        """Move an offered KV onto this replica; the staged KV and the bytes moved."""
        ...

    def insert(self, staged: Any, pages: Sequence[int]) -> None:
        """Write a received KV into ``pages``; for a hand-off with ``cached_tokens = c``, the pages from
        index ``c // page_size`` on (the staged KV starts at that page boundary)."""
        ...

    def discard(self, staged: Any) -> None: ...

    def prefill_local(self, chunks: Sequence[LocalChunk]) -> Any:
        """Queue the chunks (a forward over each chunk's tokens attending to its earlier KV in pages, writing
        the chunk's KV into its pages) behind what is queued already; ``collect`` of the handle returned
        gives, per chunk in order, the token sampled after its last token. Only a prompt's final chunk's
        sample is used. A worker proxy holds them until the next ``dispatch``, which carries them in the
        step's one call (or until ``collect``), so the engine queues a step's chunks before the step."""
        ...

    def dispatch(
        self,
        tokens: Sequence[int] | Any,
        positions: Sequence[int],
        pages: Sequence[Sequence[int]],
        sampling: Sequence[SamplingRow],
        forced: Sequence[int],
    ) -> Any:
        """Queue one decode step; ``tokens`` are host ids, or (when ``overlaps``) the handle of the step in
        flight for the same rows, whose tokens then feed this one on device."""
        ...

    def collect(self, handle: Any) -> Sampled:
        """A step's (or local chunks') sampled rows as host arrays (blocks until they have run)."""
        ...

    def reset_pools(self) -> None:
        """Fresh page pools after a failed program (its donated buffers may be gone)."""
        ...
