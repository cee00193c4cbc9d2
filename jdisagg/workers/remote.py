"""Front-side proxies of worker processes, shaped like the in-process replicas the engine drives.

The engine's stages call these exactly as they call ``PrefillReplica`` and ``DecodeReplica``; each call is
one RPC, except ``prefill_local``, whose chunks ride in the next ``Step``. Page accounting stays in the
front's scheduler: page tables are host state of the one scheduler, so no page is ever accounted in two
places and a lost worker cannot leak any.

One error contract: every transport failure of a worker call ends the request with
``WorkerUnavailableError`` (gRPC UNAVAILABLE to the client) and a message naming the worker, so clients that
retry on UNAVAILABLE retry. Only a worker's own report of a bug (INTERNAL, UNKNOWN) or a refused hand-off
(FAILED_PRECONDITION) becomes ``RuntimeError`` (INTERNAL). By status code:
- UNAVAILABLE (refused or reset connection), DEADLINE_EXCEEDED of a call other than a KV pull: the worker is
  gone. The slot goes dead, the engine stops routing to it and fails (decode) or retries elsewhere (prefill)
  what it held; the same worker after a stall, or a restarted one, can take the slot again (``connect``).
- CANCELLED: the front closed the slot's channel (it evicted the worker) while the call was in flight.
- ABORTED, or DEADLINE_EXCEEDED of a KV pull: the hand-off's *other* side was lost; the worker stays.
- NOT_FOUND: the worker no longer holds the staged KV (it discarded its state when it re-registered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from jdisagg.errors import WorkerUnavailableError
from jdisagg.executors import CompileTask, LocalChunk, PromptInput, Sampled, SamplingRow
from jdisagg.sampling_params import TOP_LOGPROBS
from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.v1 import worker_pb2_grpc as wpb_grpc

log = logging.getLogger("jdisagg.front")

_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _row(s: SamplingRow) -> wpb.SamplingRow:
    return wpb.SamplingRow(
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed, num_top=s.num_top
    )


def _sampled(tokens: Sequence[int], logprobs: Sequence[float], reply: Any) -> Sampled:
    """A reply's rows as the in-process replicas return them (alternatives zero when no row asked)."""
    rows = len(tokens)
    shape = (rows, TOP_LOGPROBS)
    top_ids = np.array(reply.top_ids, np.int32).reshape(shape) if reply.top_ids else np.zeros(shape, np.int32)
    top_lps = (
        np.array(reply.top_logprobs, np.float32).reshape(shape)
        if reply.top_logprobs
        else np.zeros(shape, np.float32)
    )
    return Sampled(np.array(tokens, np.int32), np.array(logprobs, np.float32), top_ids, top_lps)


@dataclass(frozen=True)
class RemoteKV:
    """A prefill worker's offer with the prompt it is for, as the front scheduled it: the decode worker
    accepts only the pieces of that prompt's hand-off after its cached prefix."""

    offer: wpb.KVOffer
    prompt_tokens: int
    cached_tokens: int


def _local_chunk(c: LocalChunk) -> wpb.LocalChunk:
    return wpb.LocalChunk(token_ids=list(c.token_ids), start=c.start, pages=list(c.pages),
                          sampling=_row(c.sampling), forced=c.forced)


@dataclass
class QueuedChunks:
    """Local-prefill chunks waiting on the proxy for the ``Step`` RPC that carries them; their sampled rows
    (one per chunk, in order) once it has returned."""

    chunks: list[wpb.LocalChunk]
    sampled: Sampled | None = None


class RemoteReplica:
    """A slot for one worker of a role: dead until a worker registers into it."""

    def __init__(self, role: str, index: int, rpc_timeout_s: float) -> None:
        self.role, self.index = role, index
        self._timeout = rpc_timeout_s
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: wpb_grpc.WorkerStub | None = None
        self.address: str | None = None
        self.pid: int | None = None  # the worker's process id on its own host
        self.lease = 0  # names the current registration (0: none); the worker's CheckIn quotes it
        self.last_seen = 0.0  # monotonic time of the worker's last answer

    @property
    def alive(self) -> bool:
        return self._stub is not None

    def connect(self, address: str, pid: int | None, lease: int) -> None:
        """Take a freshly registered worker into this slot (or the same worker again, under a new lease)."""
        with self._lock:
            replaced = self._stub is not None
            self._close()
            self._channel = grpc.insecure_channel(address)
            self._stub = wpb_grpc.WorkerStub(self._channel)
            self.address, self.pid, self.lease = address, pid, lease
            self.last_seen = time.monotonic()
        log.info("%s slot %d: worker at %s (pid %s) joined", self.role, self.index, address, pid)
        if replaced:  # the same address registered again without being lost first: it starts afresh
            self._state_lost(f"worker at {address} registered again")

    def mark_dead(self, reason: str, stub: wpb_grpc.WorkerStub | None = None) -> None:
        """Evict the worker; with ``stub``, only if the slot still holds that connection (a late failure of
        an old call must not evict the worker that re-registered since)."""
        with self._lock:
            if self._stub is None or (stub is not None and stub is not self._stub):
                return
            self._close()
        log.warning("%s slot %d: worker at %s lost (%s)", self.role, self.index, self.address, reason)
        self._state_lost(f"{self.role} worker {self.index} ({self.address}) lost: {reason}")

    def _state_lost(self, reason: str) -> None:
        """What the worker held is gone (a decode worker's pages); nothing to do for a prefill worker."""

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def compile_tasks(self) -> list[CompileTask]:
        return []  # the worker compiled before it registered

    def heartbeat(self, timeout_s: float) -> bool:
        """True if the worker answered. One that refuses connections is marked dead at once; a slow answer
        is only a miss (the front evicts a worker silent for longer than its eviction time)."""
        stub = self._stub
        if stub is None:
            return False
        try:
            stub.Heartbeat(wpb.Empty(), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                self.mark_dead(f"heartbeat: {exc.details()}", stub)
            return False
        except ValueError:  # the channel was closed under us: the slot went dead meanwhile
            return False
        self.last_seen = time.monotonic()
        return True

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        stub, name = self._stub, f"{self.role} worker {self.index} ({self.address})"
        if stub is None:
            raise WorkerUnavailableError(f"{self.role} worker {self.index} is down")
        try:
            reply = getattr(stub, method)(request, timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            raise self._failure(method, name, stub, exc.code(), exc.details()) from exc
        except ValueError as exc:  # "Cannot invoke RPC on closed channel": evicted between lookup and call
            if self._stub is stub:
                raise
            raise WorkerUnavailableError(f"{name} was evicted: {exc}") from exc
        self.last_seen = time.monotonic()
        return reply

    def _failure(
        self, method: str, name: str, stub: wpb_grpc.WorkerStub, code: grpc.StatusCode, details: str
    ) -> Exception:
        """The exception one failed call ends its requests with (see the module docstring)."""
        deadline = code is grpc.StatusCode.DEADLINE_EXCEEDED
        if code is grpc.StatusCode.ABORTED or (deadline and method == "Pull"):
            return WorkerUnavailableError(f"KV hand-off failed on {name}: {details}")
        if code is grpc.StatusCode.NOT_FOUND:
            return WorkerUnavailableError(f"{name} lost its staged KV (it re-registered since): {details}")
        if code is grpc.StatusCode.CANCELLED:
            return WorkerUnavailableError(f"{name} was evicted during {method}: {details}")
        if code in _LOST:
            self.mark_dead(f"{method}: {code.name}: {details}", stub)
            return WorkerUnavailableError(f"{name} was lost during {method}: {code.name}: {details}")
        return RuntimeError(f"{name}: {code.name}: {details}")


class RemotePrefillReplica(RemoteReplica):
    def __init__(self, index: int, rpc_timeout_s: float) -> None:
        super().__init__("prefill", index, rpc_timeout_s)

    def run_batch(self, prompts: Sequence[PromptInput]) -> list[tuple[Sampled, RemoteKV]]:
        """One ``Prefill`` RPC per prompt; a prompt with ``cached_tokens`` is offered only after them."""
        return [self._run(p) for p in prompts]

    def _run(self, p: PromptInput) -> tuple[Sampled, RemoteKV]:
        request = wpb.PrefillRequest(token_ids=list(p.token_ids), sampling=_row(p.sampling), forced=p.forced,
                                     cached_tokens=p.cached_tokens)
        reply = self._call("Prefill", request)
        kv = RemoteKV(reply.offer, len(p.token_ids), p.cached_tokens)
        return _sampled([reply.token], [reply.logprob], reply), kv


class RemoteDecodeReplica(RemoteReplica):
    """A decode worker's slot. Its pages are accounted in the front's scheduler, like every replica's; the
    prompts it prefills itself (local prefill) travel as chunks inside its ``Step`` calls."""

    def __init__(
        self, index: int, num_pages: int, rpc_timeout_s: float, pull_timeout_s: float, local_chunk: int = 0
    ) -> None:
        super().__init__("decode", index, rpc_timeout_s)
        self.num_pages = num_pages
        # The worker's local-prefill chunk: the front's settings tell it, and its fingerprint repeats it.
        self.local_chunk = local_chunk
        self._queued: list[QueuedChunks] = []  # local chunks the next Step RPC carries
        self._pull_timeout = pull_timeout_s
        self._pages_lost: Callable[[int, str], None] = lambda index, reason: None

    def watch_pages(self, lost: Callable[[int, str], None]) -> None:
        """Call ``lost(index, reason)`` whenever this slot's worker, and with it the KV in its pages, is gone
        (lost, or registered afresh): the engine must forget the prefix cache it kept for those pages."""
        self._pages_lost = lost

    def _state_lost(self, reason: str) -> None:
        self._pages_lost(self.index, reason)

    def receive(self, kv: RemoteKV) -> tuple[wpb.StagedKV, int]:
        """The decode worker pulls the offer from the prefill worker and stages it until ``insert``."""
        reply = self._call("Pull", wpb.PullRequest(offer=kv.offer, prompt_tokens=kv.prompt_tokens,
                                                   cached_tokens=kv.cached_tokens), self._pull_timeout)
        return reply.staged, reply.bytes

    def insert(self, staged: wpb.StagedKV, pages: Sequence[int]) -> None:
        self._call("Insert", wpb.InsertRequest(staged=staged, pages=list(pages)))

    def discard(self, staged: wpb.StagedKV) -> None:
        try:
            self._call("Discard", staged)
        except (WorkerUnavailableError, RuntimeError) as exc:
            log.debug("discard of staged KV %d failed: %s", staged.id, exc)

    def prefill_local(self, chunks: Sequence[LocalChunk]) -> QueuedChunks:
        """Queue ``chunks`` on this proxy: the next ``dispatch`` sends them in its ``Step`` RPC, ahead of the
        step's rows, so a prompt prefilled on the worker costs no round trip of its own (``collect`` of the
        handle sends them alone when no step follows)."""
        queued = QueuedChunks([_local_chunk(c) for c in chunks])
        self._queued.append(queued)
        return queued

    overlaps = False  # a step is one blocking RPC: nothing runs while the host reads it

    def dispatch(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        pages: Sequence[Sequence[int]],
        sampling: Sequence[SamplingRow],
        forced: Sequence[int],
    ) -> Sampled:
        """One blocking ``Step`` RPC, with the chunks queued before it: the step has run when it returns
        (``collect`` only hands it over)."""
        reply = self._step(wpb.StepRequest(
            tokens=list(tokens),
            positions=list(positions),
            page_counts=[len(p) for p in pages],
            page_ids=[page for p in pages for page in p],
            sampling=[_row(s) for s in sampling],
            forced=list(forced),
        ))
        return _sampled(reply.tokens, reply.logprobs, reply)

    def _step(self, request: wpb.StepRequest) -> wpb.StepReply:
        """Send a ``Step`` carrying every queued chunk, and hand each queue its rows of the reply. The queue
        is emptied first: chunks whose call failed are never sent again (their pages may be reused)."""
        queued, self._queued = self._queued, []
        request.chunks.extend(chunk for q in queued for chunk in q.chunks)
        reply = self._call("Step", request)
        if len(reply.chunks.tokens) != len(request.chunks):
            raise RuntimeError(f"decode worker {self.index} answered {len(reply.chunks.tokens)} of "
                               f"{len(request.chunks)} local chunks")
        rows = _sampled(reply.chunks.tokens, reply.chunks.logprobs, reply.chunks)
        offset = 0
        for q in queued:
            q.sampled = Sampled(*(x[offset : offset + len(q.chunks)] for x in rows))
            offset += len(q.chunks)
        return reply

    def collect(self, handle: Sampled | QueuedChunks) -> Sampled:
        """A step's rows (its RPC has run), or queued chunks' samples, sending them if no step took them."""
        if not isinstance(handle, QueuedChunks):
            return handle
        if any(q is handle for q in self._queued):
            self._step(wpb.StepRequest())
        if handle.sampled is None:
            raise RuntimeError(f"decode worker {self.index}: the Step call that carried these chunks failed")
        return handle.sampled

    def reset_pools(self) -> None:
        self._queued = []  # their sequences failed with the pools
        if self.alive:
            try:
                self._call("Reset", wpb.Empty())
            except (WorkerUnavailableError, RuntimeError) as exc:
                log.warning("reset of decode worker %d failed: %s", self.index, exc)
