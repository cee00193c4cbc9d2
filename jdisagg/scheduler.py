"""The scheduling policy: which request runs where and when, and who holds which KV page. No JAX.

The engine's stage threads run programs; every decision they need is a call on this ``Scheduler``, made under
the engine's one lock. Each call returns what the caller must do next (prefill these jobs, step these rows)
and queues ``Emission``s — tokens and finishes for the output side — which the engine drains after the call.

Why calls that return work, rather than an event queue of actions: each executor runs at its own pace on its
own thread (a prefill replica, one thread per decode replica, the KV transfer), so each asks for its next
piece of work when it is free, the way vLLM's ``schedule()`` is asked once per engine step. The policy stays
a plain object that a test drives call by call with no devices, threads or clocks.

A request moves ``WAITING -> PREFILLING -> TRANSFERRING -> READY -> RUNNING`` and ends ``DONE``; a preempted
one goes back to the front of ``WAITING`` with its tokens so far and is prefilled again from all of them.
Pages are reserved for the whole prompt when its prefill is scheduled (so its KV always has somewhere to
go), grow one page at a time while it decodes, and are freed by ``finish`` whatever stage it ended in.
A cancel (client abort, stop string, shutdown) ends a waiting request at once; elsewhere it is marked, and the
stage that next touches the request ends it, because only that stage knows its device work is done.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.kv_manager import KVManager, OutOfPages, pages_needed
from jdisagg.outputs import FinishReason, TopLogprobs
from jdisagg.requests import Request, Stage


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    max_batch: int  # rows per decode step
    max_context: int  # prompt + output tokens
    max_queue: int = 256  # waiting requests before ``add`` refuses
    max_prefill_batch: int = 8  # prompts per prefill call
    prefill_token_budget: int = 2048  # prompt tokens per prefill call (a longer prompt runs alone)


@dataclass(frozen=True)
class TokenSample:
    """One sampled token as the host read it."""

    token: int
    logprob: float
    top: TopLogprobs | None = None  # the most likely alternatives, when the request asked for them


@dataclass(frozen=True)
class Emission:
    """Output for a request's stream: new tokens, or its end (``finish`` set)."""

    request: Request
    token_ids: tuple[int, ...] = ()
    finish: FinishReason | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepPlan:
    rows: list[Request]  # in batch order
    preempted: list[Request]  # freed to make room, back at the front of the queue


Liveness = Callable[[str, int], bool]  # (role, replica index) -> can it take work now


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        prefill_replicas: Sequence[int],
        decode_pages: dict[int, int],
        eos_token_ids: Iterable[int] = (),
        alive: Liveness = lambda role, index: True,
    ) -> None:
        self.config = config
        self.kv = KVManager(decode_pages)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._prefill_replicas = tuple(prefill_replicas)
        self._alive = alive
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: dict[str, Request] = {}  # admitted and not yet retired by the output side
        self.running: dict[int, list[Request]] = {i: [] for i in decode_pages}
        self.ready: dict[int, list[Request]] = {i: [] for i in decode_pages}
        self._order = itertools.count()  # admission to decode: the youngest is preempted first
        self._admitted: dict[str, int] = {}
        self._emissions: list[Emission] = []
        self.accepting = True

    # ------------------------------------------------------------------ the front door

    def live_replicas(self) -> dict[str, int]:
        return {
            "prefill": sum(self._alive("prefill", i) for i in self._prefill_replicas),
            "decode": sum(self._alive("decode", i) for i in self.kv.pools),
        }

    def servable(self) -> bool:
        return all(self.live_replicas().values())

    def add(self, request: Request) -> None:
        """Queue a new request, or raise why not (closed, no workers, duplicate id, full queue)."""
        if not self.accepting:
            raise EngineClosedError("engine is shutting down")
        if not self.servable():
            raise WorkerUnavailableError("no live prefill or decode worker: try again later")
        if request.id in self.live:
            raise ValueError(f"request id {request.id!r} is already in flight")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"admission queue is full ({self.config.max_queue} waiting)")
        request.stage = Stage.WAITING
        self.live[request.id] = request
        self.waiting.append(request)

    def cancel(self, request: Request, reason: FinishReason) -> bool:
        """Mark ``request`` to end with ``reason``; a waiting one ends now. False if it was already ending."""
        if request.cancel is not None or request.stage is Stage.DONE:
            return False
        request.cancel = reason
        if request.stage is Stage.WAITING:
            self.waiting.remove(request)
            self.finish(request, reason)
        return True

    def retire(self, request: Request) -> None:
        """The output side delivered the final output: the id may be used again."""
        if self.live.get(request.id) is request:
            del self.live[request.id]

    def take_emissions(self) -> list[Emission]:
        emissions, self._emissions = self._emissions, []
        return emissions

    # ------------------------------------------------------------------ prefill

    def next_prefill(self) -> list[Request]:
        """The next prefill call's requests, first come first served, each with pages reserved for its
        prompt on the least-loaded live decode replica that has them. Stops at the first request that does
        not fit (no overtaking), at ``max_prefill_batch`` prompts or at the token budget; a prompt over the
        budget runs alone. Empty: nothing can start now."""
        if self.waiting and not self.servable():
            self.fail_waiting("no live prefill or decode worker")
            return []
        jobs: list[Request] = []
        tokens = 0
        while self.waiting and len(jobs) < self.config.max_prefill_batch:
            request = self.waiting[0]
            length = len(request.all_ids)
            if jobs and tokens + length > self.config.prefill_token_budget:
                break
            need = pages_needed(length + 1, self.config.page_size)
            target = self._route(need)
            if target is None:
                break
            self.waiting.popleft()
            self.kv.allocate(request.id, target, need)
            request.stage, request.replica = Stage.PREFILLING, target
            jobs.append(request)
            tokens += length
        return jobs

    def _route(self, need: int) -> int | None:
        """Least-loaded decode replica (most free pages; lowest index on ties) that can take ``need`` now."""
        fits = [i for i, pool in self.kv.pools.items() if self._alive("decode", i) and pool.free >= need]
        return max(fits, key=lambda i: (self.kv.pools[i].free, -i)) if fits else None

    def prefill_lost(self, jobs: Sequence[Request], message: str) -> list[Request]:
        """The prefill worker was lost mid-call: queue the jobs again (in order, at the front) for another
        worker, or fail them when none is left. The requests queued again."""
        retry = any(self._alive("prefill", i) for i in self._prefill_replicas)
        requeued = []
        for request in reversed(jobs):
            if retry and request.cancel is None:
                self.kv.free(request.id)
                request.stage, request.replica = Stage.WAITING, None
                self.waiting.appendleft(request)
                requeued.insert(0, request)
            else:
                self.fail(request, message, "UNAVAILABLE")
        return requeued

    def fail_waiting(self, message: str) -> None:
        while self.waiting:
            self.fail(self.waiting[0], message, "UNAVAILABLE")

    def first_token(self, request: Request, sample: TokenSample) -> bool:
        """Prefill's token reached the host. True: move the KV on; False: the request ended here."""
        finish = self._apply(request, sample)
        if finish is None and request.cancel is None:
            request.stage = Stage.TRANSFERRING
            return True
        self.finish(request, finish or request.cancel)
        return False

    # ------------------------------------------------------------------ hand-off into decode

    def kv_arrived(self, request: Request) -> bool:
        """The KV is on the decode replica. True: insert it; False: the request ended meanwhile."""
        if request.cancel is not None:
            self.finish(request, request.cancel)
            return False
        return True

    def inserted(self, request: Request) -> None:
        request.stage = Stage.READY
        self._admitted[request.id] = next(self._order)
        self.ready[request.replica].append(request)

    # ------------------------------------------------------------------ decode

    def has_work(self, replica: int) -> bool:
        return bool(self.running[replica] or self.ready[replica])

    def plan_step(self, replica: int) -> StepPlan:
        """The rows of the next step on ``replica``: end cancelled rows, fill free batch slots from the
        ready ones, and give every row a page for the token it writes — preempting the youngest sequence
        when pages run out."""
        self._admit(replica)
        running, preempted = self.running[replica], []
        for request in sorted(running, key=self._age):
            need = pages_needed(len(request.all_ids), self.config.page_size) - len(self.kv.pages(request.id))
            while need > 0 and request in running:
                try:
                    self.kv.allocate(request.id, replica, need)
                    need = 0
                except OutOfPages:
                    victim = max(running + self.ready[replica], key=self._age)
                    self._preempt(victim)
                    preempted.append(victim)
        return StepPlan(list(running), preempted)

    def plan_ahead(self, replica: int, inflight: Sequence[Request]) -> list[Request] | None:
        """Rows for a step dispatched behind the one in flight (its tokens feed this one on device), when
        nothing about the batch must change first: the same rows in the same order, none forced, none that
        the in-flight token ends by length, and a page for each row's next token without preempting."""
        self._admit(replica)
        running = self.running[replica]
        if list(inflight) != running:
            return None
        for request in running:
            if request.forced_ids or len(request.output_ids) + 1 >= request.params.max_tokens:
                return None
            if len(request.all_ids) + 1 >= self.config.max_context:
                return None
        for request in running:
            need = pages_needed(len(request.all_ids) + 1, self.config.page_size) - len(
                self.kv.pages(request.id)
            )
            if need > 0:
                try:
                    self.kv.allocate(request.id, replica, need)
                except OutOfPages:
                    return None
        return list(running)

    def _age(self, request: Request) -> int:
        return self._admitted[request.id]

    def _admit(self, replica: int) -> None:
        """End the replica's cancelled sequences; move ready ones into free batch slots."""
        for request in [r for r in self.running[replica] + self.ready[replica] if r.cancel is not None]:
            self.finish(request, request.cancel)
        ready, running = self.ready[replica], self.running[replica]
        while ready and len(running) < self.config.max_batch:
            request = ready.pop(0)
            request.stage = Stage.RUNNING
            running.append(request)

    def _preempt(self, request: Request) -> None:
        """Free the sequence's pages and queue it at the front, to be prefilled again from all its tokens."""
        self._drop(request)
        self.kv.free(request.id)
        request.metrics.preemptions += 1
        if request.cancel is not None:
            self.finish(request, request.cancel)
            return
        request.stage, request.replica = Stage.WAITING, None
        self.waiting.appendleft(request)

    def step_done(self, rows: Sequence[Request], samples: Sequence[TokenSample]) -> int:
        """A step's tokens reached the host: apply them to the rows still running (a row that ended
        meanwhile ignores its token). The number of tokens applied."""
        applied = 0
        for request, sample in zip(rows, samples, strict=False):
            if request.stage is not Stage.RUNNING:
                continue
            applied += 1
            finish = self._apply(request, sample)
            if finish is not None:
                self.finish(request, finish)
        return applied

    def replica_failed(self, replica: int, message: str, code: str = "INTERNAL") -> list[Request]:
        """A program failed on ``replica``: fail every sequence it holds (their pages return)."""
        failed = self.running[replica] + self.ready[replica]
        for request in failed:
            self.fail(request, message, code)
        return failed

    def stop_replica(self, replica: int) -> None:
        """Shutdown: end what the replica holds."""
        for request in self.running[replica] + self.ready[replica]:
            self.finish(request, FinishReason.ABORT)

    # ------------------------------------------------------------------ stop rules and ends

    def _apply(self, request: Request, sample: TokenSample) -> FinishReason | None:
        """Record a token, stream it, and say whether the request is now done (stop id, max_tokens, or the
        context is full). Stop *strings* need text: the output side finds them and cancels."""
        request.output_ids.append(sample.token)
        request.logprobs.append(sample.logprob)
        if sample.top is not None:
            request.top_logprobs.append(sample.top)
        self._emissions.append(Emission(request, (sample.token,)))
        p = request.params
        if (sample.token in self.eos_token_ids and not p.ignore_eos) or sample.token in p.stop_token_ids:
            return FinishReason.STOP
        if len(request.output_ids) >= p.max_tokens or len(request.all_ids) >= self.config.max_context:
            return FinishReason.LENGTH
        return None

    def fail(self, request: Request, message: str, code: str = "INTERNAL") -> None:
        request.error_code = code
        self.finish(request, FinishReason.ERROR, message)

    def finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        """End ``request`` wherever it is: its pages are freed before the finish is emitted."""
        if request.stage is Stage.DONE:
            return
        if request.stage is Stage.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self._drop(request)
        self.kv.free(request.id)
        request.stage = Stage.DONE
        self._emissions.append(Emission(request, (), reason, error))

    def _drop(self, request: Request) -> None:
        if request.replica is None:
            return
        for rows in (self.running[request.replica], self.ready[request.replica]):
            if request in rows:
                rows.remove(request)
        self._admitted.pop(request.id, None)

    # ------------------------------------------------------------------ views

    def pages_of(self, request: Request) -> list[int]:
        return self.kv.pages(request.id)

    def pages_used(self) -> list[int]:
        return [pool.used for pool in self.kv.pools.values()]

    def pages_total(self) -> list[int]:
        return [pool.capacity for pool in self.kv.pools.values()]

    def check(self) -> None:
        """Invariants: the used pages are exactly the live requests' pages; only requests between
        prefill and the end hold pages; rows are where their stage says."""
        self.kv.check()
        for request in self.live.values():
            holds = bool(self.kv.pages(request.id))
            if request.stage in (Stage.WAITING, Stage.DONE) and holds:
                raise AssertionError(f"{request.id} ({request.stage}) holds pages")
            if request.stage not in (Stage.WAITING, Stage.DONE) and not holds:
                raise AssertionError(f"{request.id} ({request.stage}) holds no pages")
        for replica in self.kv.pools:
            for stage, rows in ((Stage.RUNNING, self.running[replica]), (Stage.READY, self.ready[replica])):
                for request in rows:
                    if request.stage is not stage or request.replica != replica:
                        raise AssertionError(f"{request.id} is {request.stage} on {request.replica}")
