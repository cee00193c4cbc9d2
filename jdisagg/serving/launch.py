"""``jdisagg launch``: devices, engine, server, then serve until SIGTERM/SIGINT and drain.

Kept apart from the CLI parser because it imports JAX, which ``jdisagg --help`` should not pay for.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jdisagg.engine import Engine
    from jdisagg.models.config import ModelConfig
    from jdisagg.serving.openai.server import HTTPServer
    from jdisagg.sizes import ServingSizes

log = logging.getLogger("jdisagg.serving")


class LaunchError(Exception):
    """The configuration cannot work (impossible mesh, taken port, bad sizes): a one-line reason, exit 2."""


@dataclass(frozen=True)
class LaunchOptions:
    model: str | None
    prefill_mesh: str | None  # None: the default for the visible devices
    decode_mesh: str | None
    colocate: bool
    host: str
    port: int
    metrics_port: int  # 0: no metrics endpoint
    max_batch: int
    page_size: int
    num_pages: int | None
    max_context: int | None
    max_queue: int
    attention_backend: str | None
    drain_timeout: float
    progress: bool
    processes: bool = False
    control_port: int = 0
    prefill_cpus: str | None = None
    decode_cpus: str | None = None
    worker_devices: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_cache_gb: float | None = None  # per decode device
    memory_fraction: float | None = None  # of each decode device's memory (GPU/TPU)
    compile_cache: str | None = None  # a directory, "off", or None for the default directory
    tokenizer: str | None = None  # a tokenizer.json or a directory holding one; None: the model's
    served_model_name: str | None = None  # the metrics' model_name; None: the model directory's name
    http_port: int = 8000  # the OpenAI-compatible HTTP API; 0: off
    chat_template: str | None = None  # a Jinja file replacing the model's chat template
    prefix_cache: bool = True
    prefill_cache_gb: float | None = None  # None: Engine's default (one full context of KV)
    local_prefill_tokens: int | None = None  # None: Engine's default (chunked when colocated off the CPU)
    step_token_budget: int = 512


def launch(opts: LaunchOptions) -> int:
    """Serve until a signal, then drain; returns the exit code. Raises ``LaunchError`` for bad options."""
    from jdisagg.serving.devices import choose_meshes, host_devices_for, request_host_devices

    user_platforms = os.environ.get("JAX_PLATFORMS")  # the workers' (the front pins its own to cpu)
    if opts.processes:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the workers own the accelerators, not the front
    request_host_devices(host_devices_for(opts.prefill_mesh, opts.decode_mesh, opts.colocate))

    import jax

    from jdisagg.compile_cache import enable_compile_cache
    from jdisagg.meshes import build_layout, parse_mesh_spec
    from jdisagg.serving.server import GenerationServer, host_port

    meshes = choose_meshes(opts.prefill_mesh, opts.decode_mesh, opts.colocate, jax.device_count())
    try:  # cheap checks first, so a typo does not cost a model load
        if opts.processes:
            if opts.colocate:
                raise ValueError("--processes runs prefill and decode in separate workers: drop --colocate")
            _check_process_options(opts)
            from jdisagg.serving.plan import model_config

            worker_sizes = _worker_sizes(opts, model_config(opts.model), parse_mesh_spec(meshes.decode).tp)
        else:
            build_layout(meshes.prefill, meshes.decode, colocate=meshes.colocate)
        enable_compile_cache(opts.compile_cache)
        decode_dp = parse_mesh_spec(meshes.decode).dp
        http = _start_http(opts) if opts.http_port else None
        server = GenerationServer(opts.host, opts.port, opts.max_queue + opts.max_batch * decode_dp + 16)
    except (ValueError, OSError) as exc:
        raise LaunchError(str(exc)) from exc
    address = host_port(opts.host, server.port)
    engine: Engine | None = None
    stop_workers: Callable[[float], None] | None = None
    try:
        log.info("gRPC listening on %s (NOT_SERVING until the engine is ready)", address)
        try:
            if opts.processes:
                engine, stop_workers = _start_processes(opts, meshes, worker_sizes, user_platforms)
            else:
                engine = _start_engine(opts, meshes)
            server.serve(engine, opts.host, opts.metrics_port)
            if http is not None:
                http.serve(engine)
                log.info("OpenAI-compatible HTTP API on http://%s/v1", host_port(opts.host, http.port))
        except (ValueError, OSError, RuntimeError) as exc:
            raise LaunchError(str(exc)) from exc
        stop = _stop_on_signals()
        metrics = f"metrics on :{opts.metrics_port}" if opts.metrics_port else "metrics off"
        print(f"jdisagg: serving on {address} ({metrics})", flush=True)
        signum = stop.wait_for_signal()
        log.info("%s: draining in-flight requests (up to %.0f s)", signal.Signals(signum).name,
                 opts.drain_timeout)
    finally:
        if http is not None:
            http.close()  # new HTTP requests get 503 while the engine drains
        server.shutdown(engine, opts.drain_timeout)
        if http is not None:
            http.shutdown()
        if stop_workers is not None:
            stop_workers(opts.drain_timeout)
    log.info("stopped")
    return 0


def _start_engine(opts: LaunchOptions, meshes) -> Engine:
    from jdisagg.engine import Engine
    from jdisagg.serving.devices import describe_devices
    from jdisagg.tokenizer import HFTokenizer

    tokenizer = HFTokenizer.from_file(opts.tokenizer) if opts.tokenizer else None
    log.info("devices: %s", describe_devices())
    log.info("loading %s and compiling its programs", opts.model or "the built-in demo model")
    return Engine(
        opts.model, tokenizer=tokenizer, served_model_name=opts.served_model_name,
        prefill_mesh=meshes.prefill, decode_mesh=meshes.decode, colocate=meshes.colocate,
        page_size=opts.page_size, num_pages=opts.num_pages, max_batch=opts.max_batch,
        max_context=opts.max_context, max_queue=opts.max_queue,
        attention_backend=opts.attention_backend, progress=opts.progress, dtype=opts.dtype,
        kv_cache_dtype=opts.kv_cache_dtype, kv_cache_gb=opts.kv_cache_gb,
        memory_fraction=opts.memory_fraction, prefix_cache=opts.prefix_cache,
        local_prefill_tokens=opts.local_prefill_tokens, step_token_budget=opts.step_token_budget,
        prefill_cache_gb=opts.prefill_cache_gb,
    )


def _start_http(opts: LaunchOptions) -> HTTPServer:
    """The OpenAI-compatible API, listening (503 on /health) while the engine loads and compiles."""
    from jdisagg.chat_template import ChatTemplate
    from jdisagg.metrics import model_name_of
    from jdisagg.serving.openai.defaults import GenerationDefaults
    from jdisagg.serving.openai.server import HTTPServer

    return HTTPServer(
        opts.host, opts.http_port, opts.served_model_name or model_name_of(opts.model),
        ChatTemplate.for_model(opts.model, opts.chat_template), GenerationDefaults.for_model(opts.model),
    )


def _check_process_options(opts: LaunchOptions) -> None:
    """Refuse what would be silently ignored: the front sizes the KV cache before any worker has seen its
    devices, so it cannot take a share of their memory; prefill workers size their own prefix cache."""
    if opts.prefill_cache_gb is not None:
        raise ValueError("--prefill-cache-gb is not supported with --processes (each prefill worker keeps "
                         "the default budget, one full context of KV, while the prefix cache is on; "
                         "--no-prefix-cache turns it off)")
    if opts.memory_fraction is not None:
        raise ValueError("--memory-fraction is not supported with --processes (the front counts the KV "
                         "pages before any worker sees its devices): state the budget per decode device with "
                         "--kv-cache-gb, or the page count with --num-pages")


def _worker_sizes(opts: LaunchOptions, config: ModelConfig, decode_tp: int) -> ServingSizes:
    """The sizes every worker compiles for, with the page count ``--kv-cache-gb`` buys on a decode device
    (and, as in process, a context left to default lowered to what that budget holds).

    The KV dtype is counted as the workers will resolve it on CPU; ``--dtype auto`` on an accelerator
    serves in bfloat16, never wider than the checkpoint, so the stated budget holds there too.
    """
    import dataclasses

    from jdisagg.memory import GIB, KVShape, pages_for_budget, resolve_kv_cache_dtype
    from jdisagg.models.loading import serving_dtype
    from jdisagg.sizes import plan_sizes

    sizes = plan_sizes(config, page_size=opts.page_size, max_batch=opts.max_batch,
                       max_context=opts.max_context, num_pages=opts.num_pages)
    model_dtype = serving_dtype(opts.dtype, str(config.dtype), "cpu")
    kv_dtype = resolve_kv_cache_dtype(opts.kv_cache_dtype, model_dtype)
    if opts.num_pages is not None or opts.kv_cache_gb is None:
        return sizes
    kv = KVShape(config.num_layers, config.num_kv_heads, config.head_dim, decode_tp, kv_dtype)
    plan = pages_for_budget(int(opts.kv_cache_gb * GIB), kv, page_size=sizes.page_size,
                            max_context=sizes.max_context, source=f"kv_cache_gb={opts.kv_cache_gb:g}",
                            context_from_model=sizes.context_from_model)
    log.info("%s", plan.describe())
    return dataclasses.replace(sizes, num_pages=plan.num_pages, max_context=plan.max_context)


def _start_processes(
    opts: LaunchOptions, meshes, sizes: ServingSizes, jax_platforms: str | None
) -> tuple[Engine, Callable[[float], None]]:
    """The front and one child worker per replica (on ``jax_platforms``, the user's JAX_PLATFORMS); returns
    the front's engine and how to stop it all."""
    from jdisagg.meshes import parse_mesh_spec
    from jdisagg.workers.front import Front, spawn_workers, stop_workers

    front = Front(opts.model, parse_mesh_spec(meshes.prefill), parse_mesh_spec(meshes.decode), sizes,
                  host=opts.host, port=opts.control_port, attention_backend=opts.attention_backend,
                  max_queue=opts.max_queue, tokenizer_path=opts.tokenizer,
                  served_model_name=opts.served_model_name, dtype=opts.dtype,
                  kv_cache_dtype=opts.kv_cache_dtype, prefix_cache=opts.prefix_cache,
                  local_prefill_tokens=opts.local_prefill_tokens or 0,  # disaggregated: never by default
                  step_token_budget=opts.step_token_budget)
    print(f"jdisagg: workers join at {front.address}", flush=True)
    cpus = {"prefill": opts.prefill_cpus, "decode": opts.decode_cpus}
    children = spawn_workers(front, devices_per_worker=opts.worker_devices, cpus=cpus, progress=opts.progress,
                             compile_cache=opts.compile_cache,
                             env_overrides={"JAX_PLATFORMS": jax_platforms})

    def stop(grace: float) -> None:
        front.shutdown(drain=True, timeout=grace)  # the engine drained already; this stops the rest
        stop_workers(children)

    try:
        log.info("waiting for %d workers to load, compile and register", len(children))
        front.wait_until_full(timeout_s=600.0, children=children)
    except BaseException:
        stop(0.0)
        raise
    return front.engine, stop


class _SignalLatch:
    """Remembers the first SIGTERM/SIGINT; the main thread waits on it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signum = signal.SIGTERM

    def __call__(self, signum: int, frame: object) -> None:
        self._signum = signum
        self._event.set()

    def wait_for_signal(self) -> int:
        self._event.wait()
        return self._signum


def _stop_on_signals() -> _SignalLatch:
    latch = _SignalLatch()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, latch)
    return latch
