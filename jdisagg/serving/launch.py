"""``jdisagg launch``: devices, engine, server, then serve until SIGTERM/SIGINT and drain.

Kept apart from the CLI parser because it imports JAX, which ``jdisagg --help`` should not pay for.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

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


def launch(opts: LaunchOptions) -> int:
    """Serve until a signal, then drain; returns the exit code. Raises ``LaunchError`` for bad options."""
    from jdisagg.serving.devices import choose_meshes, describe_devices, request_host_devices

    request_host_devices()

    import jax

    from jdisagg.engine import Engine
    from jdisagg.meshes import build_layout, parse_mesh_spec
    from jdisagg.serving.server import GenerationServer, host_port

    meshes = choose_meshes(opts.prefill_mesh, opts.decode_mesh, opts.colocate, jax.device_count())
    try:  # cheap checks first, so a typo does not cost a model load
        build_layout(meshes.prefill, meshes.decode, colocate=meshes.colocate)
        decode_dp = parse_mesh_spec(meshes.decode).dp
        server = GenerationServer(opts.host, opts.port, opts.max_queue + opts.max_batch * decode_dp + 16)
    except (ValueError, OSError) as exc:
        raise LaunchError(str(exc)) from exc
    log.info("devices: %s", describe_devices())
    address = host_port(opts.host, server.port)
    engine = None
    try:
        log.info("gRPC listening on %s (NOT_SERVING until the engine is ready)", address)
        log.info("loading %s and compiling its programs", opts.model or "the built-in demo model")
        try:
            engine = Engine(
                opts.model, prefill_mesh=meshes.prefill, decode_mesh=meshes.decode, colocate=meshes.colocate,
                page_size=opts.page_size, num_pages=opts.num_pages, max_batch=opts.max_batch,
                max_context=opts.max_context, max_queue=opts.max_queue,
                attention_backend=opts.attention_backend, progress=opts.progress,
            )
            server.serve(engine, opts.host, opts.metrics_port)
        except (ValueError, OSError) as exc:
            raise LaunchError(str(exc)) from exc
        stop = _stop_on_signals()
        metrics = f"metrics on :{opts.metrics_port}" if opts.metrics_port else "metrics off"
        print(f"jdisagg: serving on {address} ({metrics})", flush=True)
        signum = stop.wait_for_signal()
        log.info("%s: draining in-flight requests (up to %.0f s)", signal.Signals(signum).name,
                 opts.drain_timeout)
    finally:
        server.shutdown(engine, opts.drain_timeout)
    log.info("stopped")
    return 0


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
