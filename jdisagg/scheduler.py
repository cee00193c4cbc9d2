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

With the prefix cache, a prompt holds the cached pages of its longest cached prefix on its decode replica
instead of new ones, and the prefill mesh hands off only the KV after them. A prompt with at most
``local_prefill_tokens`` uncached tokens skips the prefill mesh: ``WAITING -> PREFILLING_LOCAL -> READY``,
prefilled on its decode replica in chunks that ``plan_step`` returns with a step's rows, nothing handed
off. Full pages are cached once their KV is written (after the insert, after the last local chunk, and
when the request ends or is preempted).

Routing (which replica, local or not) is ``jdisagg.routing``; the value types are ``jdisagg.schedule_types``.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Sequence

from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.kv_manager import KVManager, OutOfPages, pages_needed
from jdisagg.outputs import FinishReason
from jdisagg.prefix_cache import extend_page_keys
from jdisagg.requests import Request, Stage
from jdisagg.routing import Placement, place
from jdisagg.schedule_types import ChunkPlan, Counters, Emission, SchedulerConfig, StepPlan, TokenSample

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
        if config.prefills_locally and config.step_token_budget < 1:
            raise ValueError(f"step_token_budget must be at least 1, got {config.step_token_budget}")
        self.config = config
        self.kv = KVManager(decode_pages)
        self.counters = Counters()
        self.eos_token_ids = frozenset(eos_token_ids)
        self._prefill_replicas = tuple(prefill_replicas)
        self._alive = alive
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: dict[str, Request] = {}  # admitted and not yet retired by the output side
        self.running: dict[int, list[Request]] = {i: [] for i in decode_pages}
        self.ready: dict[int, list[Request]] = {i: [] for i in decode_pages}
        self.local: dict[int, list[Request]] = {i: [] for i in decode_pages}  # prefilling on the replica
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

    def add_many(self, requests: Sequence[Request]) -> int:
        """Queue ``requests`` in order until the queue is full; how many were queued. Queued in one decision,
        a batch reaches the next prefill call whole (as far as its limits allow), not split by how the
        submitting thread and the prefill thread happened to interleave."""
        for queued, request in enumerate(requests):
            try:
                self.add(request)
            except QueueFullError:
                if queued == 0:
                    raise
                return queued
        return len(requests)

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
        prompt on the decode replica ``_place`` picks (the cached prefix shared, the rest new). Prompts
        to prefill locally on the way join their replica's ``local`` list instead. Stops at the first
        request that does not fit (no overtaking), at ``max_prefill_batch`` prompts or at the token budget;
        a prompt over the budget runs alone. Empty: nothing for a prefill replica now."""
        if self.waiting and not self.servable():
            self.fail_waiting("no live prefill or decode worker")
            return []
        return self._take_waiting(remote=True)

    def _take_waiting(self, remote: bool) -> list[Request]:
        """Schedule requests from the head of the queue: local ones onto their replica, remote ones (when
        ``remote``, else the first one stops it) into the returned prefill call."""
        jobs: list[Request] = []
        tokens = 0
        while self.waiting:
            request = self.waiting[0]
            length = len(request.all_ids)
            placement = self._place(request)
            if placement is None:
                break
            if not placement.local:
                if not remote or len(jobs) >= self.config.max_prefill_batch:
                    break
                if jobs and tokens + length > self.config.prefill_token_budget:
                    break
                jobs.append(request)
                tokens += length
            self.waiting.popleft()
            self._reserve(request, placement)
        return jobs

    def _place(self, request: Request) -> Placement | None:
        """Where ``request`` prefills and decodes (``jdisagg.routing``); None: no replica has room now."""
        live = {i: pool for i, pool in self.kv.pools.items() if self._alive("decode", i)}
        return place(request, self.config, self.kv, live)

    def _reserve(self, request: Request, placement: Placement) -> None:
        """Give ``request`` its cached prefix and new pages for the rest of its prompt and first token."""
        replica, hit = placement.replica, placement.hit
        length = len(request.all_ids)
        if hit:
            self.kv.share(request.id, replica, hit)
        self.kv.allocate(request.id, replica, pages_needed(length + 1, self.config.page_size) - len(hit))
        request.replica, request.cached_tokens = replica, len(hit) * self.config.page_size
        if self.config.prefix_cache:
            self.counters.queried_tokens += length
            self.counters.hit_tokens += request.cached_tokens
        if placement.local:
            request.stage, request.prefilled = Stage.PREFILLING_LOCAL, request.cached_tokens
            self.local[replica].append(request)
            self.counters.local_prefills += 1
        else:
            request.stage = Stage.PREFILLING
            self.counters.remote_prefills += 1

    def prefill_lost(self, jobs: Sequence[Request], message: str) -> list[Request]:
        """The prefill worker was lost mid-call: queue the jobs again (in order, at the front) for another
        worker, or fail them when none is left. The requests queued again."""
        retry = any(self._alive("prefill", i) for i in self._prefill_replicas)
        requeued = []
        for request in reversed(jobs):
            if request.stage is Stage.DONE:  # its cached prefix went with a failed decode replica
                continue
            if retry and request.cancel is None:
                self.kv.free(request.id)
                request.stage, request.replica, request.cached_tokens = Stage.WAITING, None, 0
                self.waiting.appendleft(request)
                requeued.insert(0, request)
            else:
                self.fail(request, message, "UNAVAILABLE")
        return requeued

    def fail_waiting(self, message: str) -> None:
        while self.waiting:
            self.fail(self.waiting[0], message, "UNAVAILABLE")

    def first_token(self, request: Request, sample: TokenSample) -> bool:
        """Prefill's token reached the host. True: move the KV on; False: the request ended (here, or
        before, with the decode replica that held its cached prefix)."""
        if request.stage is Stage.DONE:
            return False
        finish = self._apply(request, sample)
        if finish is None and request.cancel is None:
            request.stage = Stage.TRANSFERRING
            return True
        self.finish(request, finish or request.cancel)
        return False

    # ------------------------------------------------------------------ hand-off into decode

    def kv_arrived(self, request: Request) -> bool:
        """The KV is on the decode replica. True: insert it; False: the request ended meanwhile."""
        if request.stage is Stage.DONE:
            return False
        if request.cancel is not None:
            self.finish(request, request.cancel)
            return False
        return True

    def inserted(self, request: Request) -> None:
        """The KV after the cached prefix is in the request's pages: it may decode, and its prompt's full
        pages are cached."""
        self.counters.handoff_tokens += len(request.all_ids) - 1 - request.cached_tokens
        self._to_ready(request)

    def _to_ready(self, request: Request) -> None:
        request.stage = Stage.READY
        self._admitted[request.id] = next(self._order)
        self.ready[request.replica].append(request)
        self._cache_written(request)

    # ------------------------------------------------------------------ decode

    def has_work(self, replica: int) -> bool:
        return bool(self.running[replica] or self.ready[replica] or self.local[replica])

    def plan_step(self, replica: int) -> StepPlan:
        """The rows of the next step on ``replica``: end cancelled rows, fill free batch slots from the
        ready ones, and give every row a page for the token it writes — preempting when pages run out,
        local prefills first (the latest first), then the youngest sequence. Then the prompts at the head
        of the queue that prefill locally are scheduled (here or on another replica), and the replica's
        local prefills get the step's chunks: in order, one per prompt, up to ``step_token_budget``."""
        self._admit(replica)
        running, preempted = self.running[replica], []
        for request in sorted(running, key=self._age):
            need = pages_needed(len(request.all_ids), self.config.page_size) - len(self.kv.pages(request.id))
            while need > 0 and request in running:
                try:
                    self.kv.allocate(request.id, replica, need)
                    need = 0
                except OutOfPages:
                    victim = self.local[replica][-1] if self.local[replica] else max(
                        running + self.ready[replica], key=self._age
                    )
                    self._preempt(victim)
                    preempted.append(victim)
        if self.config.prefills_locally:
            self._take_waiting(remote=False)
        return StepPlan(list(running), preempted, self._plan_chunks(replica))

    def _plan_chunks(self, replica: int) -> list[ChunkPlan]:
        chunks, budget = [], self.config.step_token_budget
        for request in self.local[replica]:
            if budget <= 0:
                break
            size = min(len(request.all_ids) - request.prefilled, self.config.local_chunk, budget)
            chunks.append(ChunkPlan(request, request.prefilled, request.prefilled + size))
            budget -= size
        return chunks

    def chunk_done(self, request: Request, end: int, sample: TokenSample) -> None:
        """A local chunk's KV is written up to ``end``; after the prompt's last chunk, ``sample`` is its
        first token and the request joins the ready rows (no hand-off). A request that ended meanwhile
        ignores it."""
        if request.stage is not Stage.PREFILLING_LOCAL:
            return
        request.prefilled = end
        if end < len(request.all_ids):
            return
        self.local[request.replica].remove(request)
        finish = self._apply(request, sample)
        if finish is None and request.cancel is None:
            self._to_ready(request)
        else:
            self.finish(request, finish or request.cancel)

    def plan_ahead(self, replica: int, inflight: Sequence[Request]) -> StepPlan | None:
        """A step dispatched behind the one in flight (its tokens feed this one on device), when nothing
        about the batch must change first: the same rows in the same order, none forced, none that the
        in-flight token ends by length, and a page for each row's next token without preempting. The
        replica's local prefills get their chunks as with ``plan_step``: chunked prefill keeps the device
        as busy as plain decoding does."""
        self._admit(replica)
        if self.config.prefills_locally:
            self._take_waiting(remote=False)
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
        return StepPlan(list(running), [], self._plan_chunks(replica))

    def _age(self, request: Request) -> int:
        return self._admitted[request.id]

    def _admit(self, replica: int) -> None:
        """End the replica's cancelled sequences and local prefills; move ready ones into free batch slots."""
        for request in [r for r in self._holders(replica) if r.cancel is not None]:
            self.finish(request, request.cancel)
        ready, running = self.ready[replica], self.running[replica]
        while ready and len(running) < self.config.max_batch:
            request = ready.pop(0)
            request.stage = Stage.RUNNING
            running.append(request)

    def _preempt(self, request: Request) -> None:
        """Free the sequence's pages (caching those written) and queue it at the front, to be prefilled
        again from all its tokens — from its cached pages on, while they last."""
        self._drop(request)
        self._cache_written(request)
        self.kv.free(request.id)
        request.metrics.preemptions += 1
        if request.cancel is not None:
            self.finish(request, request.cancel)
            return
        request.stage, request.replica, request.cached_tokens = Stage.WAITING, None, 0
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
        """A program failed on ``replica`` and its pools will be reset: fail every sequence and local
        prefill it holds and every request on its way there with a cached prefix (their pages return),
        and forget its cached pages."""
        failed = self._holders(replica) + [
            r
            for r in self.live.values()
            if r.replica == replica and r.stage in (Stage.PREFILLING, Stage.TRANSFERRING) and r.cached_tokens
        ]
        for request in failed:
            self.fail(request, message, code)
        self.kv.clear_cache(replica)
        return failed

    def stop_replica(self, replica: int) -> None:
        """Shutdown: end what the replica holds."""
        for request in self._holders(replica):
            self.finish(request, FinishReason.ABORT)

    def _holders(self, replica: int) -> list[Request]:
        """The requests whose KV is being written or read on ``replica`` by its own thread."""
        return self.running[replica] + self.ready[replica] + self.local[replica]

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
        """End ``request`` wherever it is: its pages are freed (those written cached) before the finish is
        emitted. (A failed replica's cache is cleared after its requests are failed.)"""
        if request.stage is Stage.DONE:
            return
        if request.stage is Stage.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self._drop(request)
        self._cache_written(request)
        self.kv.free(request.id)
        request.stage = Stage.DONE
        self._emissions.append(Emission(request, (), reason, error))

    def _drop(self, request: Request) -> None:
        if request.replica is None:
            return
        for rows in (self.running[request.replica], self.ready[request.replica], self.local[request.replica]):
            if request in rows:
                rows.remove(request)
        self._admitted.pop(request.id, None)

    def _cache_written(self, request: Request) -> None:
        """Cache the request's full pages whose KV is written: a local prefill's chunks so far; a decoding
        sequence's every token but its last (whose KV the next step writes)."""
        if not self.config.prefix_cache:
            return
        if request.stage is Stage.PREFILLING_LOCAL:
            written = request.prefilled
        elif request.stage in (Stage.READY, Stage.RUNNING):
            written = len(request.all_ids) - 1
        else:
            return  # nothing written past its cached prefix yet
        full = written // self.config.page_size
        if full:
            keys = extend_page_keys(request.page_keys, request.all_ids, self.config.page_size)
            self.kv.cache(request.id, keys[:full])

    # ------------------------------------------------------------------ views

    def pages_of(self, request: Request) -> list[int]:
        return self.kv.pages(request.id)

    def pages_used(self) -> list[int]:
        return [pool.used for pool in self.kv.pools.values()]

    def pages_total(self) -> list[int]:
        return [pool.capacity for pool in self.kv.pools.values()]

    def pages_cached(self) -> list[int]:
        return [pool.cached for pool in self.kv.pools.values()]

    def pages_shared(self) -> list[int]:
        return [pool.shared for pool in self.kv.pools.values()]

    def evictions(self) -> int:
        return sum(pool.evictions for pool in self.kv.pools.values())

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
            for stage, rows in (
                (Stage.RUNNING, self.running[replica]),
                (Stage.READY, self.ready[replica]),
                (Stage.PREFILLING_LOCAL, self.local[replica]),
            ):
                for request in rows:
                    if request.stage is not stage or request.replica != replica:
                        raise AssertionError(f"{request.id} is {request.stage} on {request.replica}")
