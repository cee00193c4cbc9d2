"""The engine: requests in, tokens out, with prefill and decode on their own meshes.

Data flows one way through four kinds of threads joined by queues::

    submit ─► waiting ─► prefill thread (per prefill replica) ─► transfer thread ─► decode thread (per
    decode replica) ─► detokenize thread ─► RequestStream

- prefill: picks the least-loaded decode replica that has pages for the prompt, reserves them, dispatches
  the prefill program (asynchronously: the next prompt can be dispatched while this one runs).
- transfer: waits for the first token and streams it (TTFT does not wait for the KV hand-off), then moves
  the KV with ``jax.device_put`` to the decode replica's sharding and hands it to that replica.
- decode: inserts arriving KV into pages, grows and preempts, runs one step for every running sequence
  (continuous batching), applies stop rules that need no text.
- detokenize: incremental text, stop strings, the final ``Output``.

Whoever holds a request's pages frees them when it ends the request, before reporting the finish, so a
finished stream never leaves pages behind.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jdisagg.compile_counter import compile_count
from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.executors import Sampled, SamplingRow
from jdisagg.kv_cache import OutOfPages, pages_needed
from jdisagg.memory import KVShape, decode_workspace, plan_kv_pages, resolve_kv_cache_dtype
from jdisagg.meshes import PHASE_RULES, Layout, build_layout, check_fits, param_sharding_fn
from jdisagg.metrics import EngineMetrics, model_name_of
from jdisagg.models.loading import ModelSource, load_model
from jdisagg.outputs import FinishReason, Output, RequestMetrics, StreamChunk
from jdisagg.replicas import (
    DecodeReplica,
    PrefillReplica,
    build_decode_replica,
    build_prefill_replica,
)
from jdisagg.requests import Request, RequestStream
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.devices import devices_needed, provide_cpu_devices
from jdisagg.sizes import ServingSizes, plan_sizes
from jdisagg.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("jdisagg.engine")

_IDLE_POLL_S = 0.02


@dataclass(eq=False)
class _Sequence:
    """A request on a decode replica, with the pages it owns there."""

    request: Request
    pages: list[int]
    order: int  # admission order: the youngest is preempted first


@dataclass(eq=False)
class _Step:
    """A decode step in flight: the replica's handle and the rows it computes, in order."""

    handle: Any
    rows: list[_Sequence]


@dataclass(eq=False)
class _Handoff:
    request: Request
    replica: DecodeReplica
    pages: list[int]
    sampled: Sampled  # the first token, one row of device arrays
    kv: Any  # the replica pair's hand-off: (k, v) arrays in process, an offer to pull across processes


@dataclass
class _DetokState:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0
    token_ids: list[int] = field(default_factory=list)
    stopped: bool = False


def _load_onto(
    source: ModelSource, mesh: Any, phase: str, loaded: dict[Any, tuple[nnx.GraphDef, Any]]
) -> tuple[nnx.GraphDef, Any]:
    """One replica's params, read straight into the phase's sharding on its mesh (each device reads only
    its own slice), split into the graph and the state its programs take. Replicas with the same devices
    and rules (colocated prefill and decode) share one copy through ``loaded``."""
    key = (tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()), PHASE_RULES[phase])
    if key not in loaded:
        heads = {"num_heads": source.config.num_heads, "num_kv_heads": source.config.num_kv_heads}
        loaded[key] = nnx.split(source.load(param_sharding_fn(mesh, PHASE_RULES[phase], heads)))
    return loaded[key]


class Engine:
    """Disaggregated serving engine. Construction loads, places and compiles everything; then it serves.

    Args:
        model: None for the built-in demo model, a directory (HF safetensors or a jdisagg/orbax checkpoint),
            or an ``nnx.Module`` implementing ``jdisagg.models.protocol.ServingModel`` (bring your own).
        prefill_mesh / decode_mesh: ``TPxDP`` specs, e.g. ``"4x1"`` and ``"2x2"``.
        colocate: run both phases on the same devices (the baseline disaggregation is measured against).
        page_size: tokens per KV page. max_batch: sequences per decode replica and step.
        num_pages: pages per decode replica; overrides the two budgets below.
        kv_cache_gb: KV budget per decode device (the way to size the cache on CPU, which reports no
            memory). memory_fraction: share of each decode device's memory for params + KV + workspace
            (default 0.9 on GPU/TPU). With none of the three on CPU: every batch slot holds a full context.
        dtype: params and activations, ``auto`` (bfloat16 on GPU/TPU, the checkpoint's dtype on CPU),
            ``bfloat16``, ``float16`` or ``float32``. kv_cache_dtype: ``auto`` (the model's) or ``bfloat16``.
        max_context: longest sequence (prompt + output), a multiple of ``page_size``.
        max_queue: waiting requests before ``submit`` raises ``QueueFullError``.
        attention_backend: paged-attention backend for ``jdisagg.kernels`` (None: by platform).
        served_model_name: the metrics' ``model_name`` label (default: the checkpoint directory's name,
            ``demo`` for the built-in model).
        devices: the devices to lay the meshes on (default: all visible; on a CPU-only host, when JAX has
            not started yet, the CPU is split into as many virtual devices as the meshes need).
    """

    def __init__(
        self,
        model: Any = None,
        *,
        tokenizer: Tokenizer | None = None,
        prefill_mesh: str = "1x1",
        decode_mesh: str = "1x1",
        colocate: bool = False,
        page_size: int = 16,
        num_pages: int | None = None,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 256,
        attention_backend: str | None = None,
        progress: bool = True,
        devices: Sequence[jax.Device] | None = None,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        kv_cache_gb: float | None = None,
        memory_fraction: float | None = None,
        served_model_name: str | None = None,
    ) -> None:
        if devices is None:
            provide_cpu_devices(devices_needed(prefill_mesh, decode_mesh, colocate))
        self.layout: Layout = build_layout(prefill_mesh, decode_mesh, colocate=colocate, devices=devices)
        self.model_name = served_model_name or model_name_of(model)
        decode_devices = [d for mesh in self.layout.decode.replicas for d in mesh.devices.flat]
        platform = decode_devices[0].platform
        source, self.tokenizer = load_model(model, tokenizer, dtype=dtype, platform=platform)
        self.config = config = source.config
        for phase in (self.layout.prefill, self.layout.decode):
            check_fits(
                phase.spec, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, phase=phase.name
            )
        sizes = plan_sizes(
            config, page_size=page_size, max_batch=max_batch, max_context=max_context, num_pages=num_pages
        )
        self.page_size, self.max_batch, self.max_queue = page_size, max_batch, max_queue
        self.max_context = sizes.max_context
        kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, str(config.dtype))
        log.info("%s", self.layout.describe())
        log.info("loading %s in %s (KV cache in %s)", source.description, config.dtype, kv_dtype)
        placed = tqdm(
            desc="loading params",
            total=len(self.layout.prefill.replicas) + len(self.layout.decode.replicas),
            disable=not progress,
            unit="replica",
        )
        prefill, decode_params, loaded = [], [], {}
        for i, mesh in enumerate(self.layout.prefill.replicas):
            params = _load_onto(source, mesh, "prefill", loaded)
            prefill.append(build_prefill_replica(i, mesh, *params, sizes))
            placed.update()
        for mesh in self.layout.decode.replicas:
            decode_params.append(_load_onto(source, mesh, "decode", loaded))
            placed.update()
        del loaded
        placed.close()
        kv = KVShape(config.num_layers, config.num_kv_heads, config.head_dim, self.layout.decode.spec.tp,
                     kv_dtype)
        sizes = plan_kv_pages(
            sizes, kv, devices=decode_devices, num_pages=num_pages, kv_cache_gb=kv_cache_gb,
            memory_fraction=memory_fraction,
            workspace=lambda: decode_workspace(*decode_params[0], self.layout.decode.replicas[0], sizes, kv,
                                               attention_backend),
        )
        decode = [
            build_decode_replica(i, mesh, graphdef, state, sizes, attention_backend, kv_dtype)
            for i, (mesh, (graphdef, state)) in enumerate(zip(self.layout.decode.replicas, decode_params,
                                                              strict=True))
        ]
        self._start(prefill, decode, progress)

    @classmethod
    def from_replicas(
        cls,
        config: Any,
        tokenizer: Tokenizer,
        prefill: Sequence[Any],
        decode: Sequence[Any],
        *,
        sizes: ServingSizes,
        max_queue: int = 256,
        progress: bool = True,
        served_model_name: str | None = None,
    ) -> Engine:
        """An engine over replicas built elsewhere, e.g. proxies of worker processes (``jdisagg.workers``).

        A replica only needs what the stages call: ``index``, ``alive``, ``compile_tasks()``; prefill:
        ``run()``; decode: ``allocator``, ``receive()``, ``insert()``, ``discard()``, ``step()``,
        ``reset_pools()``. One whose ``alive`` is False is skipped until it comes back.
        """
        engine = cls.__new__(cls)
        engine.config, engine.tokenizer = config, tokenizer
        engine.model_name = served_model_name or "unnamed"
        engine.page_size, engine.max_context = sizes.page_size, sizes.max_context
        engine.max_batch, engine.max_queue = sizes.max_batch, max_queue
        engine._start(list(prefill), list(decode), progress)
        return engine

    def _start(self, prefill: list[Any], decode: list[Any], progress: bool) -> None:
        """Compile every program, then start the stage threads."""
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)
        self.metrics = EngineMetrics(self.model_name, compile_count)
        self._prefill, self._decode = prefill, decode
        for role in ("prefill", "decode"):
            self.metrics.live_workers.labels(role).set_function(lambda role=role: self.live_replicas()[role])
        self._compile_all(progress)
        self.warm_compile_count = compile_count()

        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._live: dict[str, Request] = {}
        self._accepting = True
        self._stopping = False
        self._order = itertools.count()
        self._transfers: queue.Queue[_Handoff | None] = queue.Queue(maxsize=4)
        self._inboxes: dict[int, queue.Queue[tuple[Request, list[int], Any] | None]] = {
            r.index: queue.Queue() for r in self._decode
        }
        # Unbounded on purpose: its producers are bounded by the batch size, and abort() reports into it
        # while holding the scheduler lock, which a full queue would turn into a deadlock with detokenize.
        self._detok: queue.Queue[tuple[Request, list[int], FinishReason | None, str | None] | None] = (
            queue.Queue()
        )
        self._threads = (
            [
                threading.Thread(target=self._prefill_loop, args=(p,), name=f"prefill-{p.index}", daemon=True)
                for p in self._prefill
            ]
            + [threading.Thread(target=self._transfer_loop, name="transfer", daemon=True)]
            + [
                threading.Thread(target=self._decode_loop, args=(d,), name=f"decode-{d.index}", daemon=True)
                for d in self._decode
            ]
            + [threading.Thread(target=self._detok_loop, name="detokenize", daemon=True)]
        )
        for thread in self._threads:
            thread.start()
        self._update_gauges()
        log.info(
            "engine ready: %d compiled programs, %d XLA compilations",
            self._num_programs,
            self.warm_compile_count,
        )

    # ------------------------------------------------------------------ set-up

    def _compile_all(self, progress: bool) -> None:
        tasks = [t for r in self._prefill for t in r.compile_tasks()]
        tasks += [t for r in self._decode for t in r.compile_tasks()]
        self._num_programs = len(tasks)
        bar = tqdm(tasks, desc="compiling", disable=not progress, unit="program")
        for name, run in bar:
            bar.set_postfix_str(name)
            run()

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; returns its stream at once. Raises ``ValueError`` for bad input."""
        return self._submit(prompt, params or SamplingParams(), request_id, [])

    def score(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        """Log-probability of each token of ``continuation`` after ``prompt``, through the serving path.

        The continuation is forced token by token: its first token is scored by prefill, every later one by
        a decode step reading the paged cache on the decode mesh — the same programs that serve requests.
        """
        return self.score_many([(prompt, continuation)])[0]

    def score_many(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """``score`` for many (prompt, continuation) pairs at once, batched like any other requests."""
        streams = []
        for prompt, continuation in pairs:
            forced = self._token_ids(continuation, "continuation")
            if not forced:
                raise ValueError("continuation is empty")
            params = SamplingParams(max_tokens=len(forced), ignore_eos=True)
            while True:
                try:
                    streams.append(self._submit(prompt, params, None, forced))
                    break
                except QueueFullError:
                    time.sleep(_IDLE_POLL_S)
        return [s.result().logprobs for s in streams]

    def _token_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"{what} token ids {bad[:8]} are outside the vocabulary [0, {self.config.vocab_size})"
            )
        return ids

    def _submit(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None, forced: list[int]
    ) -> RequestStream:
        params.validate(self.config.vocab_size)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._token_ids(prompt, "prompt")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) + len(forced) >= self.max_context + (1 if forced else 0):
            raise ValueError(
                f"prompt has {len(ids) + len(forced)} tokens; the context holds {self.max_context} "
                "(prompt + output)"
            )
        request_id = request_id or uuid.uuid4().hex
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        sampling = SamplingRow(params.temperature, params.top_k, params.top_p, seed, params.logprobs)
        stream = RequestStream(request_id, self.abort)
        request = Request(
            request_id,
            ids,
            params,
            sampling,
            stream,
            RequestMetrics(arrival=time.monotonic()),
            forced_ids=forced,
        )
        with self._cv:
            if not self._accepting:
                raise EngineClosedError("engine is shutting down")
            if not self._servable():
                raise WorkerUnavailableError("no live prefill or decode worker: try again later")
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in flight")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"admission queue is full ({self.max_queue} waiting)")
            self._live[request_id] = request
            self._waiting.append(request)
            self._cv.notify_all()
        self.metrics.queue_depth.labels("waiting").set(len(self._waiting))
        return stream

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its pages are freed. False if it is not in flight."""
        with self._cv:
            request = self._live.get(request_id)
            return request is not None and self._cancel(request, FinishReason.ABORT)

    def _cancel(self, request: Request, reason: FinishReason) -> bool:
        """Mark ``request`` to end with ``reason``. A waiting request ends here; elsewhere the stage holding
        its pages ends it on its next pass."""
        with self._cv:
            if request.cancel is not None:
                return False
            request.cancel = reason
            if request in self._waiting:
                self._waiting.remove(request)
                self._report(request, [], reason)
        return True

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[Output]:
        """Submit every prompt (waiting when the queue is full) and return their outputs in order."""
        streams = []
        for prompt in prompts:
            while True:
                try:
                    streams.append(self.submit(prompt, params))
                    break
                except QueueFullError:
                    time.sleep(_IDLE_POLL_S)
        return [s.result() for s in streams]

    def stats(self) -> dict[str, Any]:
        return {
            "pages_used": [r.allocator.used for r in self._decode],
            "pages_total": [r.allocator.capacity for r in self._decode],
            "queue_depth": {
                "waiting": len(self._waiting),
                "transfer": self._transfers.qsize(),
                "decode_inbox": sum(q.qsize() for q in self._inboxes.values()),
            },
            "live": len(self._live),
            "compile_count": compile_count(),
        }

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish (``drain``) or abort the ones in flight; stop the threads."""
        with self._cv:
            if self._stopping:
                return
            self._accepting = False
            if not drain:
                for request_id in list(self._live):
                    self.abort(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._live and (deadline is None or time.monotonic() < deadline):
            time.sleep(_IDLE_POLL_S)
        for request_id in list(self._live):  # timed out draining: abort the rest
            self.abort(request_id)
        while self._live and (deadline is None or time.monotonic() < deadline + 5.0):
            time.sleep(_IDLE_POLL_S)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._transfers.put(None)
        for inbox in self._inboxes.values():
            inbox.put(None)
        self._detok.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(drain=False)

    # ------------------------------------------------------------------ shared helpers

    def _release(self, replica: DecodeReplica, pages: list[int]) -> None:
        if pages:
            replica.allocator.release(pages)
            with self._cv:
                self._cv.notify_all()

    def _report(
        self, request: Request, token_ids: list[int], finish: FinishReason | None, error: str | None = None
    ) -> None:
        self._detok.put((request, token_ids, finish, error))

    def _on_token(self, request: Request, sampled: Sampled, row: int) -> FinishReason | None:
        """Record row ``row`` of a sampled batch, stream it, and say whether the request is now done."""
        token = int(sampled.tokens[row])
        request.output_ids.append(token)
        request.logprobs.append(float(sampled.logprobs[row]))
        if k := request.params.logprobs:
            ids, lps = sampled.top_ids[row][:k].tolist(), sampled.top_logprobs[row][:k].tolist()
            request.top_logprobs.append(list(zip(ids, lps, strict=True)))
        self.metrics.generation_tokens.inc()
        p = request.params
        finish = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            finish = FinishReason.STOP
        elif len(request.output_ids) >= p.max_tokens or len(request.all_ids) >= self.max_context:
            finish = FinishReason.LENGTH
        self._report(request, [token], None)
        return finish

    def _fail(
        self, request: Request, replica: DecodeReplica | None, pages: list[int], exc: BaseException
    ) -> None:
        if isinstance(exc, WorkerUnavailableError):
            log.error("request %s lost its worker: %s", request.id, exc)
            request.error_code = "UNAVAILABLE"
            message = str(exc)
        else:
            log.exception("request %s failed", request.id, exc_info=exc)
            message = f"{type(exc).__name__}: {exc}"
        if replica is not None:
            self._release(replica, pages)
        self._report(request, [], FinishReason.ERROR, message)

    def _update_gauges(self) -> None:
        for r in self._decode:
            self.metrics.pages_used.labels(str(r.index)).set(r.allocator.used)
            self.metrics.pages_total.labels(str(r.index)).set(r.allocator.capacity)
        self.metrics.queue_depth.labels("waiting").set(len(self._waiting))
        self.metrics.queue_depth.labels("transfer").set(self._transfers.qsize())
        self.metrics.queue_depth.labels("decode_inbox").set(sum(q.qsize() for q in self._inboxes.values()))

    # ------------------------------------------------------------------ prefill

    def _pick_replica(self, need: int) -> DecodeReplica | None:
        """Least-loaded decode replica (most free pages) that can take ``need`` pages now."""
        fits = [r for r in self._decode if r.alive and r.allocator.free >= need]
        return max(fits, key=lambda r: (r.allocator.free, -r.index)) if fits else None

    def _prefill_loop(self, prefill: PrefillReplica) -> None:
        while True:
            with self._cv:
                while (not self._waiting or not prefill.alive) and not self._stopping:
                    if self._waiting and not self._servable():
                        self._fail_waiting()
                    self._cv.wait(timeout=None if prefill.alive else _IDLE_POLL_S * 10)
                if self._stopping:
                    return
                request = self._waiting[0]
                need = pages_needed(len(request.all_ids) + 1, self.page_size)
                target = self._pick_replica(need)
                if target is None:
                    if not self._servable():
                        self._fail_waiting()
                    self._cv.wait(timeout=_IDLE_POLL_S)
                    continue
                self._waiting.popleft()
                pages = target.allocator.allocate(need)
            self._update_gauges()
            m = request.metrics
            if m.scheduled is None:
                m.scheduled = time.monotonic()
                self.metrics.queue_time.observe(m.scheduled - m.arrival)
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            try:
                sampled, kv = prefill.run(request.all_ids, request.sampling, request.next_forced)
            except WorkerUnavailableError as exc:
                self._retry_elsewhere(request, target, pages, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the stage
                self._fail(request, target, pages, exc)
                continue
            self._transfers.put(_Handoff(request, target, pages, sampled, kv))

    def live_replicas(self) -> dict[str, int]:
        """Replicas per role that can take work now: all of them in process; live workers across processes
        (health reports SERVING only while both roles have one)."""
        return {"prefill": sum(p.alive for p in self._prefill), "decode": sum(d.alive for d in self._decode)}

    def _servable(self) -> bool:
        """Some prefill and some decode replica are alive (always, in process)."""
        return all(self.live_replicas().values())

    def _fail_waiting(self) -> None:
        """No worker of a role is left: end every waiting request now (UNAVAILABLE) instead of letting it
        wait for a worker that may never come."""
        while self._waiting:
            request = self._waiting.popleft()
            self._fail(request, None, [], WorkerUnavailableError("no live prefill or decode worker"))

    def _retry_elsewhere(
        self, request: Request, target: Any, pages: list[int], exc: WorkerUnavailableError
    ) -> None:
        """A prefill worker was lost mid-request: queue the request again for another one, or fail it
        (UNAVAILABLE) when none is left."""
        if not any(p.alive for p in self._prefill) or request.cancel is not None:
            self._fail(request, target, pages, exc)
            return
        log.warning("retrying %s on another prefill worker: %s", request.id, exc)
        self._release(target, pages)
        with self._cv:
            self._waiting.appendleft(request)
            self._cv.notify_all()

    # ------------------------------------------------------------------ transfer

    def _transfer_loop(self) -> None:
        while (item := self._transfers.get()) is not None:
            request, target = item.request, item.replica
            try:
                finish = self._on_token(request, Sampled(*(np.asarray(x) for x in item.sampled)), 0)
                if finish is not None or request.cancel is not None:
                    self._release(target, item.pages)
                    self._report(request, [], finish or request.cancel)
                    continue
                start = time.perf_counter()
                kv, nbytes = target.receive(item.kv)
                self.metrics.transfer_seconds.inc(time.perf_counter() - start)
                self.metrics.transfer_bytes.inc(nbytes)
            except Exception as exc:  # noqa: BLE001
                self.metrics.transfer_failures.inc()
                self._fail(request, target, item.pages, exc)
                continue
            self._inboxes[target.index].put((request, item.pages, kv))

    # ------------------------------------------------------------------ decode

    def _decode_loop(self, replica: DecodeReplica) -> None:
        """Continuous batching on one decode replica.

        When the next step runs the same rows as the one in flight (the steady state), it is dispatched
        *before* the host reads the in-flight step's tokens: those tokens feed it on device, so the device
        never waits for Python to stream tokens, check stops or build the next step. A row that finishes in
        the step being read then computes one token in the step behind it, which is dropped. Any change to
        the batch (a row joins, ends, is cancelled or needs preempting) first reads the step in flight.
        """
        running: list[_Sequence] = []
        ready: list[_Sequence] = []
        inflight: _Step | None = None
        inbox = self._inboxes[replica.index]
        while True:
            idle = not running and not ready and inflight is None
            try:
                item = inbox.get(timeout=_IDLE_POLL_S) if idle else inbox.get_nowait()
                while True:
                    if item is None:
                        self._end_all(replica, running + ready, FinishReason.ABORT)
                        return
                    self._admit(replica, item, ready)
                    item = inbox.get_nowait()
            except queue.Empty:
                pass
            for seq in [s for s in running + ready if s.request.cancel is not None]:
                self._drop(seq, running, ready)
                self._release(replica, seq.pages)
                self._report(seq.request, [], seq.request.cancel)
            while ready and len(running) < self.max_batch:
                running.append(ready.pop(0))
            try:
                if inflight is not None:
                    ahead = self._step_ahead(replica, inflight, running)
                    self._collect(replica, inflight, running)
                    inflight = ahead
                    continue
                self._grow(replica, running, ready)
                self._update_gauges()
                self.metrics.running.labels(str(replica.index)).set(len(running))
                if running:
                    inflight = _Step(self._dispatch(replica, running, None), list(running))
            except Exception as exc:  # noqa: BLE001 - the pools may be gone: fail this replica's work
                for seq in running + ready:
                    self._fail(seq.request, replica, seq.pages, exc)
                running.clear()
                ready.clear()
                inflight = None
                replica.reset_pools()

    def _dispatch(self, replica: DecodeReplica, rows: list[_Sequence], behind: _Step | None) -> Any:
        """Dispatch a step for ``rows``: from their last host tokens, or behind the step in flight."""
        offset = 0 if behind is None else 1  # behind a step, each row is one token further
        return replica.dispatch(
            behind.handle if behind is not None else [s.request.all_ids[-1] for s in rows],
            [len(s.request.all_ids) - 1 + offset for s in rows],
            [s.pages for s in rows],
            [s.request.sampling for s in rows],
            [s.request.next_forced for s in rows],
        )

    def _step_ahead(self, replica: DecodeReplica, inflight: _Step, running: list[_Sequence]) -> _Step | None:
        """The next step, dispatched behind ``inflight`` when nothing about the batch has to change first:
        the same rows in the same order, none forced, none that the in-flight token ends by length, and a
        page for every row's next token without preempting anyone."""
        if not replica.overlaps or inflight.rows != running:
            return None
        for seq in running:
            r = seq.request
            if r.forced_ids or len(r.output_ids) + 1 >= r.params.max_tokens:
                return None
            if len(r.all_ids) + 1 >= self.max_context:
                return None
        for seq in running:
            need = pages_needed(len(seq.request.all_ids) + 1, self.page_size) - len(seq.pages)
            if need > 0:
                try:
                    seq.pages += replica.allocator.allocate(need)
                except OutOfPages:
                    return None
        return _Step(self._dispatch(replica, running, inflight), list(running))

    def _collect(self, replica: DecodeReplica, step: _Step, running: list[_Sequence]) -> None:
        """Read a step's tokens and apply them to the rows still running (a row that ended meanwhile, by a
        cancel, a preemption or in the step before, ignores its token)."""
        sampled = replica.collect(step.handle)
        for row, seq in enumerate(step.rows):
            if seq not in running:
                continue
            finish = self._on_token(seq.request, sampled, row)
            if finish is not None:
                running.remove(seq)
                self._release(replica, seq.pages)
                self._report(seq.request, [], finish)

    def _admit(
        self,
        replica: DecodeReplica,
        item: tuple[Request, list[int], Any],
        ready: list[_Sequence],
    ) -> None:
        request, pages, kv = item
        if request.cancel is not None:
            replica.discard(kv)
            self._release(replica, pages)
            self._report(request, [], request.cancel)
            return
        try:
            replica.insert(kv, pages)
        except Exception as exc:  # noqa: BLE001
            self._fail(request, replica, pages, exc)
            return
        ready.append(_Sequence(request, pages, next(self._order)))

    @staticmethod
    def _drop(seq: _Sequence, running: list[_Sequence], ready: list[_Sequence]) -> None:
        (running if seq in running else ready).remove(seq)

    def _grow(self, replica: DecodeReplica, running: list[_Sequence], ready: list[_Sequence]) -> None:
        """Give each running sequence a page for its next token; out of pages, preempt the youngest."""
        for seq in sorted(running, key=lambda s: s.order):
            need = pages_needed(len(seq.request.all_ids), self.page_size) - len(seq.pages)
            while need > 0 and seq in running:
                try:
                    seq.pages += replica.allocator.allocate(need)
                    need = 0
                except OutOfPages:
                    victim = max(running + ready, key=lambda s: s.order)
                    self._preempt(replica, victim, running, ready)

    def _preempt(
        self, replica: DecodeReplica, seq: _Sequence, running: list[_Sequence], ready: list[_Sequence]
    ) -> None:
        """Free the sequence's pages and queue it to be prefilled again from all its tokens (recompute)."""
        self._drop(seq, running, ready)
        self._release(replica, seq.pages)
        request = seq.request
        request.metrics.preemptions += 1
        self.metrics.preemptions.inc()
        log.info(
            "preempted %s (%d tokens) on decode replica %d", request.id, len(request.all_ids), replica.index
        )
        with self._cv:
            if request.cancel is not None:
                self._report(request, [], request.cancel)
            else:
                self._waiting.appendleft(request)
                self._cv.notify_all()

    def _end_all(self, replica: DecodeReplica, seqs: list[_Sequence], reason: FinishReason) -> None:
        for seq in seqs:
            self._release(replica, seq.pages)
            self._report(seq.request, [], reason)

    # ------------------------------------------------------------------ detokenize

    def _detok_loop(self) -> None:
        states: dict[str, _DetokState] = {}
        while (item := self._detok.get()) is not None:
            request, token_ids, finish, error = item
            if self._live.get(request.id) is not request:
                continue  # a late event of a finished request
            state = states.setdefault(request.id, _DetokState(IncrementalDetokenizer(self.tokenizer)))
            if state.stopped:
                # A stop string ended the text; wait for the stage holding the pages to report the finish.
                if finish is not None:
                    self._finish(request, state, [], "", FinishReason.STOP, None)
                    del states[request.id]
                continue
            self._stamp(request, len(token_ids))
            state.token_ids += token_ids
            state.text += state.detokenizer.add(token_ids)
            if finish is not None:
                state.text += state.detokenizer.flush()
            stop_at = self._find_stop(request.params.stop, state.text, state.emitted)
            if stop_at is not None:
                state.text = state.text[:stop_at]
                if finish is None:
                    state.stopped = True
                    self._cancel(request, FinishReason.STOP)
                    delta = state.text[state.emitted :]
                    state.emitted = len(state.text)
                    if token_ids or delta:
                        request.stream._push(self._chunk(request, state, token_ids, delta))
                    continue
                finish = FinishReason.STOP
            holdback = 0 if finish is not None else max((len(s) for s in request.params.stop), default=1) - 1
            end = max(state.emitted, len(state.text) - holdback)
            delta = state.text[state.emitted : end]
            state.emitted = end
            if finish is None:
                if token_ids or delta:
                    request.stream._push(self._chunk(request, state, token_ids, delta))
                continue
            self._finish(request, state, token_ids, delta, finish, error)
            del states[request.id]

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

    @staticmethod
    def _find_stop(stops: tuple[str, ...], text: str, emitted: int) -> int | None:
        longest = max((len(s) for s in stops), default=0)
        start = max(0, emitted - longest)
        hits = [i for s in stops if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _finish(
        self,
        request: Request,
        state: _DetokState,
        token_ids: list[int],
        delta: str,
        finish: FinishReason,
        error: str | None,
    ) -> None:
        m = request.metrics
        m.finished = time.monotonic()
        output = Output(
            request.id,
            request.prompt_ids,
            state.token_ids,
            state.text,
            finish,
            m,
            error,
            request.logprobs[: len(state.token_ids)],
            request.error_code if finish is FinishReason.ERROR else None,
            request.top_logprobs[: len(state.token_ids)],
        )
        with self._cv:
            self._live.pop(request.id, None)
        self.metrics.requests.labels(finish.value).inc()
        self.metrics.e2e.observe(m.finished - m.arrival)
        if m.tpot is not None:
            self.metrics.tpot.observe(m.tpot)
        request.stream._finish(output)
        request.stream._push(self._chunk(request, state, token_ids, delta, finish, error))

    @staticmethod
    def _chunk(
        request: Request,
        state: _DetokState,
        token_ids: list[int],
        delta: str,
        finish: FinishReason | None = None,
        error: str | None = None,
    ) -> StreamChunk:
        """A chunk of the latest ``token_ids`` (the tail of ``state.token_ids``), with their logprobs."""
        start, end = len(state.token_ids) - len(token_ids), len(state.token_ids)
        return StreamChunk(
            request.id,
            token_ids,
            delta,
            finish,
            error,
            request.logprobs[start:end],
            request.top_logprobs[start:end],
        )
