"""The engine: requests in, tokens out, with prefill and decode on their own meshes.

``Engine`` is the public face and a thin driver: construction builds the replicas (``jdisagg.build``) and
compiles every program; then requests go to the ``Scheduler`` (policy, no JAX) and the stage threads
(``jdisagg.stages``) run the executors it schedules: request -> scheduler -> prefill program -> KV transfer
-> decode program -> stream.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import jax

from jdisagg.build import build_replicas, compile_programs
from jdisagg.compile_counter import compile_count
from jdisagg.errors import QueueFullError
from jdisagg.executors import DecodeExecutor, PrefillExecutor, SamplingRow
from jdisagg.metrics import EngineMetrics, model_name_of
from jdisagg.output_processor import OutputProcessor
from jdisagg.outputs import FinishReason, Output, RequestMetrics
from jdisagg.requests import Request, RequestStream
from jdisagg.sampling_params import SamplingParams
from jdisagg.scheduler import Scheduler, SchedulerConfig
from jdisagg.sizes import ServingSizes
from jdisagg.stages import IDLE_POLL_S, Stages
from jdisagg.tokenizer import Tokenizer

log = logging.getLogger("jdisagg.engine")


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
        prefix_cache: reuse the KV of full pages a decode replica already holds for a prompt's prefix:
            only the rest is handed off (or prefilled locally).
        local_prefill_tokens: prefill a prompt on its decode replica, in chunks interleaved with decode
            steps, when at most this many of its tokens are uncached (0: never). Default: never when
            disaggregated; colocated, every prompt (chunked prefill) on GPU/TPU and none on the CPU, where
            a whole prompt on the prefill thread runs beside the decode steps and measured best
            (``jdisagg.build.colocated_chunks_by_default``).
        step_token_budget: prompt tokens prefilled locally per decode step.
        prefill_cache_gb: GiB of KV each prefill replica keeps of long prompts' leading chunks, so a prompt
            sharing them is prefilled only from its first uncached chunk (``jdisagg.prefill_cache``); 0: off.
            Default: one full context of KV, off when colocated or with ``prefix_cache`` off.
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
        prefix_cache: bool = True,
        local_prefill_tokens: int | None = None,
        step_token_budget: int = 512,
        prefill_cache_gb: float | None = None,
    ) -> None:
        _check_prefill_limits(local_prefill_tokens, step_token_budget)
        if (prefill_cache_gb or 0) < 0:
            raise ValueError(f"want prefill_cache_gb >= 0, got {prefill_cache_gb}")
        built = build_replicas(
            model, tokenizer=tokenizer, prefill_mesh=prefill_mesh, decode_mesh=decode_mesh, colocate=colocate,
            page_size=page_size, num_pages=num_pages, max_batch=max_batch, max_context=max_context,
            attention_backend=attention_backend, progress=progress, devices=devices, dtype=dtype,
            kv_cache_dtype=kv_cache_dtype, kv_cache_gb=kv_cache_gb, memory_fraction=memory_fraction,
            prefix_cache=prefix_cache,
            local_prefill=None if local_prefill_tokens is None else local_prefill_tokens > 0,
            prefill_cache_gb=prefill_cache_gb,
        )
        self.layout = built.layout
        self._configure(built.config, built.tokenizer, built.sizes, max_queue,
                        served_model_name or model_name_of(model))
        if local_prefill_tokens is None:  # every prompt where the platform's colocated default chunks
            local_prefill_tokens = built.sizes.max_context if built.local_prefill else 0
        self._start(built.prefill, built.decode, progress, prefix_cache, local_prefill_tokens,
                    step_token_budget)

    @classmethod
    def from_replicas(
        cls,
        config: Any,
        tokenizer: Tokenizer,
        prefill: Sequence[PrefillExecutor],
        decode: Sequence[DecodeExecutor],
        *,
        sizes: ServingSizes,
        max_queue: int = 256,
        progress: bool = True,
        served_model_name: str | None = None,
        prefix_cache: bool = True,
        local_prefill_tokens: int = 0,
        step_token_budget: int = 512,
    ) -> Engine:
        """An engine over replicas built elsewhere, e.g. proxies of worker processes (``jdisagg.workers``):
        anything that implements the ``jdisagg.executors`` Protocols. One whose ``alive`` is False is skipped
        until it comes back. ``prefix_cache``, ``local_prefill_tokens`` and ``step_token_budget``: as
        ``Engine``'s (the prefill replicas must take ``cached_tokens``; local prefill needs decode replicas
        whose ``local_chunk`` is above 0, default off). A decode replica with ``watch_pages`` reports when
        its pages' KV is gone (a lost worker): what it held fails and its cached pages are forgotten."""
        _check_prefill_limits(local_prefill_tokens, step_token_budget)
        local = f"up to {local_prefill_tokens} uncached tokens" if local_prefill_tokens else "off"
        cache = "on" if prefix_cache else "off"
        log.info("prefix cache %s, local prefill %s (worker processes)", cache, local)
        engine = cls.__new__(cls)
        engine._configure(config, tokenizer, sizes, max_queue, served_model_name or "unnamed")
        engine._start(list(prefill), list(decode), progress, prefix_cache, local_prefill_tokens,
                      step_token_budget)
        for replica in decode:
            if hasattr(replica, "watch_pages"):
                replica.watch_pages(lambda index, reason: engine._stages.call(
                    engine.scheduler.replica_failed, index, reason, "UNAVAILABLE"))
        return engine

    def _configure(
        self, config: Any, tokenizer: Tokenizer, sizes: ServingSizes, max_queue: int, model_name: str
    ) -> None:
        self.config, self.tokenizer, self.model_name = config, tokenizer, model_name
        self.page_size, self.max_context, self.max_batch = sizes.page_size, sizes.max_context, sizes.max_batch
        self.max_queue = max_queue
        self._sizes = sizes

    def _start(self, prefill: list[Any], decode: list[Any], progress: bool, prefix_cache: bool,
               local_prefill_tokens: int, step_token_budget: int) -> None:
        """Compile every program, then start the stage threads."""
        sizes = self._sizes
        local_chunk = min(d.local_chunk for d in decode) if local_prefill_tokens else 0
        self.scheduler_config = SchedulerConfig(
            sizes.page_size, sizes.max_batch, sizes.max_context, max_queue=self.max_queue,
            max_prefill_batch=sizes.prefill_call_prompts, prefill_token_budget=sizes.prefill_token_budget,
            prefix_cache=prefix_cache, local_prefill_tokens=local_prefill_tokens,
            local_chunk=local_chunk, step_token_budget=step_token_budget,
        )
        self.metrics = EngineMetrics(self.model_name, compile_count)
        self._prefill, self._decode = prefill, decode
        # When every prompt prefills locally (colocated on GPU/TPU by default), prefill replicas never run.
        idle = local_chunk and local_prefill_tokens >= sizes.max_context
        self._num_programs = compile_programs(([] if idle else prefill) + decode, progress)
        self.warm_compile_count = compile_count()
        by_role = {"prefill": {p.index: p for p in prefill}, "decode": {d.index: d for d in decode}}
        self.scheduler = Scheduler(
            self.scheduler_config,
            prefill_replicas=[p.index for p in prefill],
            decode_pages={d.index: d.num_pages for d in decode},
            eos_token_ids=set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids),
            alive=lambda role, index: by_role[role][index].alive,
        )
        for role in ("prefill", "decode"):
            self.metrics.live_workers.labels(role).set_function(lambda role=role: self.live_replicas()[role])
        self.metrics.watch_scheduler(self.scheduler)
        # In-process replicas expose their own prefix cache; a prefill worker keeps its cache to itself.
        caches = [getattr(p, "prefill_cache", None) for p in prefill]
        self.metrics.watch_prefill_caches([c for c in caches if c is not None])
        self._stages = Stages(self.scheduler, prefill, decode, OutputProcessor(self.tokenizer), self.metrics)
        self._cv = self._stages.lock  # the scheduler's lock: holding it pauses every scheduling decision
        self._stopping = False
        self._stages.start()
        self._stages.update_gauges()
        log.info("engine ready: %d compiled programs, %d XLA compilations", self._num_programs,
                 self.warm_compile_count)

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
        requests = []
        for prompt, continuation in pairs:
            forced = self._token_ids(continuation, "continuation")
            if not forced:
                raise ValueError("continuation is empty")
            params = SamplingParams(max_tokens=len(forced), ignore_eos=True)
            requests.append(self._request(prompt, params, None, forced))
        self._queue_all(requests)
        return [r.stream.result().logprobs for r in requests]

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
    ) -> list[Output]:
        """Submit every prompt (all validated first; waiting when the queue is full) and return their outputs
        in order."""
        requests = [self._request(prompt, params or SamplingParams(), None, []) for prompt in prompts]
        self._queue_all(requests)
        return [r.stream.result() for r in requests]

    def _queue_all(self, requests: Sequence[Request]) -> None:
        """Queue ``requests`` in order, as many per scheduler decision as the queue holds (``add_many``: a
        batch reaches prefill together), waiting while it is full."""
        while requests:
            try:
                requests = requests[self._stages.call(self.scheduler.add_many, requests):]
            except QueueFullError:
                time.sleep(IDLE_POLL_S)
        self.metrics.queue_depth.labels("waiting").set(len(self.scheduler.waiting))

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
        request = self._request(prompt, params, request_id, forced)
        self._stages.call(self.scheduler.add, request)
        self.metrics.queue_depth.labels("waiting").set(len(self.scheduler.waiting))
        return request.stream

    def _request(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None, forced: list[int]
    ) -> Request:
        """A validated request, not yet queued (``ValueError`` names what is wrong)."""
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
        return Request(request_id, ids, params, sampling, stream, RequestMetrics(arrival=time.monotonic()),
                       forced_ids=forced)

    def abort(self, request_id: str) -> bool:
        """Cancel a request wherever it is; its pages are freed. False if it is not in flight."""
        with self._cv:
            request = self.scheduler.live.get(request_id)
            if request is None:
                return False
            return self._stages.call(self.scheduler.cancel, request, FinishReason.ABORT)

    def live_replicas(self) -> dict[str, int]:
        """Replicas per role that can take work now: all of them in process; live workers across processes
        (health reports SERVING only while both roles have one)."""
        return self.scheduler.live_replicas()

    def stats(self) -> dict[str, Any]:
        """Pages, queues, live requests and the scheduler's counters now, and the XLA compilations so far."""
        return {**self._stages.stats(), "compile_count": compile_count()}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish (``drain``) or abort the ones in flight; stop the threads."""
        with self._cv:
            if self._stopping:
                return
            self.scheduler.accepting = False
        if not drain:
            self._abort_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.scheduler.live and (deadline is None or time.monotonic() < deadline):
            time.sleep(IDLE_POLL_S)
        self._abort_all()  # timed out draining: abort the rest
        while self.scheduler.live and (deadline is None or time.monotonic() < deadline + 5.0):
            time.sleep(IDLE_POLL_S)
        self._stopping = True
        self._stages.stop()

    def _abort_all(self) -> None:
        for request_id in list(self.scheduler.live):
            self.abort(request_id)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(drain=False)


def _check_prefill_limits(local_prefill_tokens: int | None, step_token_budget: int) -> None:
    """Refuse local-prefill limits the scheduler cannot honour, before anything is built."""
    if (local_prefill_tokens or 0) < 0 or step_token_budget < 1:
        raise ValueError(f"want local_prefill_tokens >= 0 and step_token_budget >= 1, got "
                         f"{local_prefill_tokens} and {step_token_budget}")
