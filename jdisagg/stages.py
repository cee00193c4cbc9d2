"""The engine's threads: they run the executors and carry results between them and the scheduler.

Data flows one way::

    scheduler.waiting ─► prefill thread (per prefill replica) ─► transfer thread ─► decode thread (per decode
    replica) ─► output thread ─► RequestStream

- prefill: asks the scheduler for the next group of prompts (pages already reserved on their decode
  replica) and dispatches them in one ``run_batch`` call; the next call can be dispatched while it runs.
- transfer: reads each first token (TTFT does not wait for the KV hand-off), then moves the KV onto its
  decode replica (``receive``) and passes it to that replica's thread.
- decode: inserts arrived KV, asks the scheduler for the step's rows and runs them, one step ahead of the
  host in the steady state; queues the local-prefill chunks the scheduler plans with a step (prompts
  prefilled from the replica's own pages, no hand-off) just before it.
- output: text, stop strings and the final ``Output`` (``OutputProcessor``).

Every decision is a ``Scheduler`` call under the one lock (``call``); the tokens and finishes it emits go
to the output thread in the order they were decided. Device work runs outside the lock.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from jdisagg.errors import WorkerUnavailableError
from jdisagg.executors import DecodeExecutor, LocalChunk, PrefillExecutor, PromptInput, Sampled
from jdisagg.metrics import EngineMetrics
from jdisagg.output_processor import OutputProcessor
from jdisagg.outputs import FinishReason
from jdisagg.requests import Request
from jdisagg.scheduler import ChunkPlan, Emission, Scheduler, TokenSample

log = logging.getLogger("jdisagg.engine")

IDLE_POLL_S = 0.02
# The interpreter's thread switch interval while engines run. A decode thread launches a step every
# millisecond or so on a GPU and gives up the GIL inside each launch; at Python's default 5 ms it can wait
# that long to get it back from a thread running Python (output, gRPC, HTTP). On an H200 (demo model, batch
# 8; not a clean A/B, docs/benchmarks.md): engine TPOT 2.22 ms at 5 ms with a stack sampler running, 1.50 ms
# at 0.1 ms without one.
SWITCH_INTERVAL_S = 1e-4
T = TypeVar("T")


@dataclass(frozen=True)
class _Handoff:
    request: Request
    sampled: Sampled  # the first token: one row, still on device
    offer: Any  # the prefill executor's KV offer


class _Wake:
    """A decode inbox item with no KV: another thread scheduled local prefill on this replica."""


_WAKE = _Wake()


@dataclass(frozen=True)
class _Step:
    handle: Any  # the decode executor's in-flight step
    rows: list[Request]


def token_samples(sampled: Sampled, rows: Sequence[Request]) -> list[TokenSample]:
    """Host-side tokens of a collected step, one per row (alternatives only where a row asked)."""
    tokens, logprobs = sampled.tokens.tolist(), sampled.logprobs.tolist()
    samples = []
    for i, request in enumerate(rows[: len(tokens)]):
        top = None
        if k := request.params.logprobs:
            top = list(
                zip(sampled.top_ids[i][:k].tolist(), sampled.top_logprobs[i][:k].tolist(), strict=True)
            )
        samples.append(TokenSample(tokens[i], logprobs[i], top))
    return samples


def _failure(exc: BaseException) -> tuple[str, str]:
    """(message, gRPC code) a request fails with."""
    if isinstance(exc, WorkerUnavailableError):
        return str(exc), "UNAVAILABLE"
    return f"{type(exc).__name__}: {exc}", "INTERNAL"


class Stages:
    def __init__(
        self,
        scheduler: Scheduler,
        prefill: Sequence[PrefillExecutor],
        decode: Sequence[DecodeExecutor],
        processor: OutputProcessor,
        metrics: EngineMetrics,
    ) -> None:
        self.scheduler, self.metrics, self._processor = scheduler, metrics, processor
        self._prefill, self._decode = list(prefill), list(decode)
        self.lock = threading.Condition()
        self.stopping = False
        self.transfers: queue.Queue[_Handoff | None] = queue.Queue(maxsize=4)
        self.inboxes: dict[int, queue.Queue[tuple[Request, Any] | _Wake | None]] = {
            d.index: queue.Queue() for d in decode
        }
        # Unbounded on purpose: emissions are queued under the lock, which a full queue would deadlock.
        self.outputs: queue.Queue[Emission | None] = queue.Queue()
        self._threads = (
            [
                threading.Thread(target=self._prefill_loop, args=(p,), name=f"prefill-{p.index}")
                for p in prefill
            ]
            + [threading.Thread(target=self._transfer_loop, name="transfer")]
            + [
                threading.Thread(target=self._decode_loop, args=(d,), name=f"decode-{d.index}")
                for d in decode
            ]
            + [threading.Thread(target=self._output_loop, name="output")]
        )

    def start(self) -> None:
        if sys.getswitchinterval() > SWITCH_INTERVAL_S:  # process-wide, and left so: see SWITCH_INTERVAL_S
            log.info("thread switch interval %.1f ms -> %.1f ms for the decode threads",
                     1e3 * sys.getswitchinterval(), 1e3 * SWITCH_INTERVAL_S)
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.transfers.put(None)
        for inbox in self.inboxes.values():
            inbox.put(None)
        self.outputs.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)

    def call(self, decide: Callable[..., T], *args: Any) -> T:
        """Run one scheduler decision under the lock; pass on what it emitted; wake the threads that may
        now have work: the prefill threads while prompts wait (they wait on the lock for nothing else), and
        a decode thread idling on its inbox when local prefill was scheduled onto its replica.

        Prefill threads are not woken when nothing waits: a decode step makes two decisions, and each
        wake-up is a thread that takes the GIL and the lock to find an empty queue, while the decode
        thread may be waiting for both (not timed on its own)."""
        with self.lock:
            try:
                return decide(*args)
            finally:
                for emission in self.scheduler.take_emissions():
                    self.outputs.put(emission)
                if self.scheduler.waiting:
                    self.lock.notify_all()
                for index, local in self.scheduler.local.items():
                    if local and self.inboxes[index].empty():
                        self.inboxes[index].put(_WAKE)

    def stats(self) -> dict[str, Any]:
        """Pages, queue depths, live requests and the scheduler's counters, read under the lock."""
        with self.lock:
            scheduler = self.scheduler
            return {
                "pages_used": scheduler.pages_used(),
                "pages_total": scheduler.pages_total(),
                "queue_depth": {
                    "waiting": len(scheduler.waiting),
                    "transfer": self.transfers.qsize(),
                    "decode_inbox": sum(q.qsize() for q in self.inboxes.values()),
                },
                "live": len(scheduler.live),
                "pages_cached": scheduler.pages_cached(),
                "evictions": scheduler.evictions(),
                **dataclasses.asdict(scheduler.counters),
            }

    def update_gauges(self) -> None:
        """Page and queue gauges. The scheduler's state is read under the lock: other threads change it
        meanwhile (a page count read mid-update raised "dictionary changed size during iteration")."""
        s, m = self.scheduler, self.metrics
        with self.lock:
            pools = list(zip(
                s.kv.pools, s.pages_used(), s.pages_total(), s.pages_cached(), s.pages_shared(), strict=True
            ))
            waiting = len(s.waiting)
        for index, used, total, cached, shared in pools:
            m.pages_used.labels(str(index)).set(used)
            m.pages_total.labels(str(index)).set(total)
            m.pages_cached.labels(str(index)).set(cached)
            m.pages_shared.labels(str(index)).set(shared)
        m.queue_depth.labels("waiting").set(waiting)
        m.queue_depth.labels("transfer").set(self.transfers.qsize())
        m.queue_depth.labels("decode_inbox").set(sum(q.qsize() for q in self.inboxes.values()))

    # ------------------------------------------------------------------ prefill

    def _next_prefill(self, prefill: PrefillExecutor) -> list[Request] | None:
        """Wait for the next group of prompts (None: stopping)."""
        with self.lock:
            while not self.stopping:
                if prefill.alive and (jobs := self.call(self.scheduler.next_prefill)):
                    return jobs
                if self.scheduler.waiting and not self.scheduler.servable():
                    self.call(self.scheduler.fail_waiting, "no live prefill or decode worker")
                # Pages free and workers return without a notify from here: poll while anything waits.
                self.lock.wait(timeout=IDLE_POLL_S if self.scheduler.waiting or not prefill.alive else None)
        return None

    def _prefill_loop(self, prefill: PrefillExecutor) -> None:
        while (jobs := self._next_prefill(prefill)) is not None:
            self.update_gauges()
            self._scheduled(jobs)
            try:
                results = prefill.run_batch(
                    [PromptInput(r.all_ids, r.sampling, r.next_forced, r.cached_tokens) for r in jobs]
                )
            except WorkerUnavailableError as exc:
                for request in self.call(self.scheduler.prefill_lost, jobs, str(exc)):
                    log.warning("retrying %s on another prefill worker: %s", request.id, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad call must not stop the stage
                log.exception("prefill of %d prompts failed", len(jobs))
                for request in jobs:
                    self.call(self.scheduler.fail, request, *_failure(exc))
                continue
            for request, (sampled, offer) in zip(jobs, results, strict=True):
                self.transfers.put(_Handoff(request, sampled, offer))

    def _scheduled(self, requests: Sequence[Request]) -> None:
        """Their prefill starts: the queue time and prompt tokens of those starting for the first time."""
        now = time.monotonic()
        for request in requests:
            if request.metrics.scheduled is None:
                request.metrics.scheduled = now
                self.metrics.queue_time.observe(now - request.metrics.arrival)
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))

    # ------------------------------------------------------------------ transfer

    def _transfer_loop(self) -> None:
        while (item := self.transfers.get()) is not None:
            request = item.request
            try:
                first = Sampled(*(np.asarray(x) for x in item.sampled))
                if not self.call(self.scheduler.first_token, request, token_samples(first, [request])[0]):
                    continue
                target = self._decode_by_index(request.replica)
                start = time.perf_counter()
                staged, nbytes = target.receive(item.offer)
                self.metrics.transfer_seconds.inc(time.perf_counter() - start)
                self.metrics.transfer_bytes.inc(nbytes)
            except Exception as exc:  # noqa: BLE001
                log.error("KV hand-off of %s failed: %s", request.id, exc)
                self.metrics.transfer_failures.inc()
                self.call(self.scheduler.fail, request, *_failure(exc))
                continue
            self.inboxes[target.index].put((request, staged))

    def _decode_by_index(self, index: int | None) -> DecodeExecutor:
        return next(d for d in self._decode if d.index == index)

    # ------------------------------------------------------------------ decode

    def _decode_loop(self, replica: DecodeExecutor) -> None:
        """Continuous batching on one decode replica.

        When the next step runs the same rows as the one in flight (the steady state), it is dispatched
        *before* the host reads the in-flight step's tokens: those tokens feed it on device, so the device
        never waits for Python to stream tokens, check stops or build the next step. A row that finishes in
        the step being read then computes one token in the step behind it, which is dropped.
        """
        s, index = self.scheduler, replica.index
        inflight: _Step | None = None
        while True:
            if not self._admit_arrivals(replica, block=inflight is None and not s.has_work(index)):
                self.call(s.stop_replica, index)
                return
            try:
                if inflight is not None:
                    plan = self.call(s.plan_ahead, index, inflight.rows) if replica.overlaps else None
                    # Chunks queue before the step ahead: their samples are ready while it still runs.
                    chunks = self._prefill_locally(replica, plan.chunks) if plan and plan.chunks else None
                    ahead = _Step(self._dispatch(replica, plan.rows, inflight), plan.rows) if plan else None
                    sampled = replica.collect(inflight.handle)
                    applied = self.call(s.step_done, inflight.rows, token_samples(sampled, inflight.rows))
                    self.metrics.generation_tokens.inc(applied)
                    if chunks is not None:
                        self._chunks_done(replica, *chunks)
                    inflight = ahead
                    continue
                plan = self.call(s.plan_step, index)
                for request in plan.preempted:
                    self.metrics.preemptions.inc()
                    log.info(
                        "preempted %s (%d tokens) on decode replica %d",
                        request.id,
                        len(request.all_ids),
                        index,
                    )
                self.update_gauges()
                self.metrics.running.labels(str(index)).set(len(plan.rows))
                # Chunks queue before the step (as ahead): a worker proxy sends them in the step's one RPC.
                chunks = self._prefill_locally(replica, plan.chunks) if plan.chunks else None
                if plan.rows:
                    inflight = _Step(self._dispatch(replica, plan.rows, None), plan.rows)
                if chunks is not None:
                    self._chunks_done(replica, *chunks)
            except Exception as exc:  # noqa: BLE001 - the pools may be gone: fail this replica's work
                log.exception("decode replica %d failed", index)
                self.call(s.replica_failed, index, *_failure(exc))
                inflight = None
                replica.reset_pools()

    def _admit_arrivals(self, replica: DecodeExecutor, block: bool) -> bool:
        """Insert every KV that has arrived for ``replica`` (waiting a little for one when idle). False:
        the engine is stopping."""
        inbox, s = self.inboxes[replica.index], self.scheduler
        try:
            item = inbox.get(timeout=IDLE_POLL_S) if block else inbox.get_nowait()
            while True:
                if item is None:
                    return False
                if isinstance(item, _Wake):
                    item = inbox.get_nowait()
                    continue
                request, staged = item
                if not self.call(s.kv_arrived, request):
                    replica.discard(staged)
                else:
                    try:  # the hand-off starts after the cached prefix, at a page boundary
                        cached_pages = request.cached_tokens // s.config.page_size
                        replica.insert(staged, s.pages_of(request)[cached_pages:])
                        self.call(s.inserted, request)
                    except Exception as exc:  # noqa: BLE001
                        log.error("KV insert of %s failed: %s", request.id, exc)
                        self.call(s.fail, request, *_failure(exc))
                item = inbox.get_nowait()
        except queue.Empty:
            return True

    def _prefill_locally(
        self, replica: DecodeExecutor, chunks: Sequence[ChunkPlan]
    ) -> tuple[Sequence[ChunkPlan], Any]:
        """Queue a step's local-prefill chunks on the replica: the chunks and their in-flight handle."""
        self._scheduled([c.request for c in chunks])
        # Page lists are the scheduler's state: read them under its lock, like every other decision.
        inputs = self.call(lambda: [
            LocalChunk(c.request.all_ids[c.start : c.end], c.start, list(self.scheduler.pages_of(c.request)),
                       c.request.sampling, c.request.next_forced)
            for c in chunks
        ])
        return chunks, replica.prefill_local(inputs)

    def _chunks_done(self, replica: DecodeExecutor, chunks: Sequence[ChunkPlan], handle: Any) -> None:
        """Wait for queued chunks and pass each one's end and sample on."""
        sampled = replica.collect(handle)
        for chunk, sample in zip(chunks, token_samples(sampled, [c.request for c in chunks]), strict=True):
            self.call(self.scheduler.chunk_done, chunk.request, chunk.end, sample)

    def _dispatch(self, replica: DecodeExecutor, rows: list[Request], behind: _Step | None) -> Any:
        """Dispatch a step for ``rows``: from their last host tokens, or behind the step in flight."""
        offset = 0 if behind is None else 1  # behind a step, each row is one token further
        return replica.dispatch(
            behind.handle if behind is not None else [r.all_ids[-1] for r in rows],
            [len(r.all_ids) - 1 + offset for r in rows],
            [self.scheduler.pages_of(r) for r in rows],
            [r.sampling for r in rows],
            [r.next_forced for r in rows],
        )

    # ------------------------------------------------------------------ output

    def _output_loop(self) -> None:
        while (emission := self.outputs.get()) is not None:
            request = emission.request
            token_ids = list(emission.token_ids)
            self._stamp(request, len(token_ids))
            done = self._processor.process(request, token_ids, emission.finish, emission.error)
            if done.stop:
                self.call(self.scheduler.cancel, request, FinishReason.STOP)
            if done.output is not None:  # retired first: a client may reuse the id once it has the output
                self.call(self.scheduler.retire, request)
                self._finished(request, done.output.finish_reason)
                request.stream.complete(done.output)
            if done.chunk is not None:
                request.stream.deliver(done.chunk)

    def _stamp(self, request: Request, count: int) -> None:
        """Time tokens as they reach the stream, which is when a client can see them (TTFT, ITL)."""
        if not count:
            return
        now = time.monotonic()
        m = request.metrics
        if m.first_token is None:
            m.first_token = now
            self.metrics.ttft.observe(now - m.arrival)
        elif m.token_times:
            self.metrics.itl.observe(now - m.token_times[-1])
        m.token_times += [now] * count

    def _finished(self, request: Request, finish: FinishReason) -> None:
        m = request.metrics
        m.finished = time.monotonic()
        self.metrics.requests.labels(finish.value).inc()
        self.metrics.e2e.observe(m.finished - m.arrival)
        if m.tpot is not None:
            self.metrics.tpot.observe(m.tpot)
