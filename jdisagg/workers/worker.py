"""``jdisagg worker``: one prefill or decode replica in its own process, serving the internal Worker API.

Start-up: ask the front for the serving settings (so a worker can never compile for other sizes than the
front schedules), load the model, place it on this process's first ``tp`` devices, compile, listen, and
register with a fingerprint of what it compiled. The front refuses a worker whose fingerprint differs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from jdisagg.executors import LocalChunk, PromptInput, Sampled, SamplingRow
from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.v1 import worker_pb2_grpc as wpb_grpc
from jdisagg.workers.membership import Membership, RegistrationRefused

log = logging.getLogger("jdisagg.worker")

ROLES = ("prefill", "decode")


class WorkerStartError(Exception):
    """The worker cannot start (front unreachable, settings it cannot serve, refused): exit 2."""


class InvalidRequestError(ValueError):
    """A request this worker refuses before running anything (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class WorkerOptions:
    role: str
    join: str  # the front's control address
    host: str
    port: int
    model: str | None  # None: the model the front names
    devices: int | None  # CPU only: virtual devices to split the host into (default: the role's tp)
    cpus: str | None  # CPU cores to pin this process to, e.g. "0-3" or "0,2"
    offer_timeout: float | None  # None: the front's
    progress: bool
    exit_with_parent: bool
    dtype: str = "auto"  # params and activations; must match the other role's workers (fingerprint)
    kv_cache_dtype: str = "auto"  # decode: the page pools' dtype
    compile_cache: str | None = None  # a directory, "off", or None for the default directory
    tokenizer: str | None = None  # a tokenizer.json (or its directory) for a checkpoint that has none


def fingerprint(config: Any, kv_dtype: str, settings: wpb.Settings) -> str:
    """What front and workers must agree on, as canonical JSON."""
    return json.dumps(
        {
            "layers": config.num_layers,
            "heads": config.num_heads,
            "kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "vocab": config.vocab_size,
            "kv_dtype": kv_dtype,
            "page_size": settings.page_size,
            "num_pages": settings.num_pages,
            "max_context": settings.max_context,
            "max_batch": settings.max_batch,
            "prefix_cache": settings.prefix_cache,
            "local_chunk": settings.local_chunk,
        },
        sort_keys=True,
    )


def parse_cpus(text: str) -> set[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@contextmanager
def _rpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    """Map failures onto status codes the front tells apart: FAILED_PRECONDITION for a refused hand-off,
    INVALID_ARGUMENT for a refused request, ABORTED for a lost peer (the sender's transfer server), INTERNAL
    for the rest. UNAVAILABLE is never sent: it means *this* worker is gone."""
    from jdisagg.workers.handoff import LayoutMismatchError, PeerLostError

    try:
        yield
    except LayoutMismatchError as exc:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except InvalidRequestError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except PeerLostError as exc:
        context.abort(grpc.StatusCode.ABORTED, str(exc))
    except KeyError as exc:
        context.abort(grpc.StatusCode.NOT_FOUND, f"no staged KV {exc}")
    except Exception as exc:  # noqa: BLE001 - report, keep serving
        log.exception("worker RPC failed")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _top_fields(top_ids: np.ndarray, top_logprobs: np.ndarray, asked: bool) -> dict[str, list]:
    """The most likely alternatives for a reply, flattened row-major; nothing when no row asked."""
    if not asked:
        return {}
    return {"top_ids": top_ids.ravel().tolist(), "top_logprobs": top_logprobs.ravel().tolist()}


def _sampling_row(s: wpb.SamplingRow) -> SamplingRow:
    return SamplingRow(s.temperature, s.top_k, s.top_p, s.seed, s.num_top)


def _sampled_rows(sampled: Sampled, chunks: list[LocalChunk]) -> wpb.SampledRows:
    """Local chunks' samples for a reply (alternatives only when a chunk asked)."""
    return wpb.SampledRows(
        tokens=sampled.tokens.tolist(),
        logprobs=sampled.logprobs.tolist(),
        **_top_fields(sampled.top_ids, sampled.top_logprobs, any(c.sampling.num_top for c in chunks)),
    )


class WorkerService(wpb_grpc.WorkerServicer):
    """The Worker API over one local replica. A method of the other role answers FAILED_PRECONDITION."""

    def __init__(self, role: str, replica: Any, sender: Any = None, receiver: Any = None) -> None:
        self.role, self._replica = role, replica
        self._sender, self._receiver = sender, receiver
        self._staged: dict[int, tuple[tuple[Any, Any], ...]] = {}  # pulled KV pieces, by staged id
        self._next_id = 1
        self._lock = threading.Lock()
        # Pools are replaced by Insert/Step and by Reset: a reset must never interleave with a step that
        # the front abandoned when it evicted this worker and that finishes only after the stall.
        self._pools = threading.Lock()

    def _require(self, role: str, context: grpc.ServicerContext) -> None:
        if self.role != role:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.role} worker, not {role}")

    def Heartbeat(self, request: wpb.Empty, context: grpc.ServicerContext) -> wpb.Empty:
        return wpb.Empty()

    def Prefill(self, request: wpb.PrefillRequest, context: grpc.ServicerContext) -> wpb.PrefillReply:
        self._require("prefill", context)
        s = request.sampling
        prompt = PromptInput(list(request.token_ids), _sampling_row(s), request.forced, request.cached_tokens)
        with _rpc_errors(context):
            try:  # the KV is cut after the cached prefix (jdisagg.kv_suffix): offered is only the rest
                ((sampled, kv),) = self._replica.run_batch([prompt])
            except ValueError as exc:  # checked before anything runs: a prompt or cached prefix it cannot cut
                raise InvalidRequestError(str(exc)) from exc
            if not context.is_active():  # the front gave up on this call (e.g. evicted us mid-stall):
                return wpb.PrefillReply()  # nobody would ever pull an offer, so make none
            offer = self._sender.offer(kv)
            token, logprob, top_ids, top_logprobs = (np.asarray(x) for x in sampled)
            return wpb.PrefillReply(
                token=int(token[0]),
                logprob=float(logprob[0]),
                offer=offer,
                **_top_fields(top_ids, top_logprobs, s.num_top > 0),
            )

    def Pull(self, request: wpb.PullRequest, context: grpc.ServicerContext) -> wpb.PullReply:
        self._require("decode", context)
        if request.prompt_tokens < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a pull must name the prompt it is for "
                          f"(prompt_tokens={request.prompt_tokens})")
        with _rpc_errors(context):
            start = time.perf_counter()
            pieces = self._receiver.pull(request.offer, request.prompt_tokens, request.cached_tokens)
            seconds = time.perf_counter() - start
            with self._lock:
                staged_id, self._next_id = self._next_id, self._next_id + 1
                self._staged[staged_id] = pieces
            nbytes = sum(k.nbytes + v.nbytes for k, v in pieces)
            return wpb.PullReply(staged=wpb.StagedKV(id=staged_id), bytes=nbytes, seconds=seconds)

    def Insert(self, request: wpb.InsertRequest, context: grpc.ServicerContext) -> wpb.Empty:
        self._require("decode", context)
        with _rpc_errors(context):
            with self._lock:
                kv = self._staged.pop(request.staged.id)
            with self._pools:
                self._replica.insert(kv, list(request.pages))
            return wpb.Empty()

    def Discard(self, request: wpb.StagedKV, context: grpc.ServicerContext) -> wpb.Empty:
        with self._lock:
            self._staged.pop(request.id, None)
        return wpb.Empty()

    def Step(self, request: wpb.StepRequest, context: grpc.ServicerContext) -> wpb.StepReply:
        """The local-prefill chunks queued first, then the step's rows, on the device back to back; one
        reply with both (a chunk the programs cannot run refuses the whole call before anything runs)."""
        self._require("decode", context)
        pages, offset = [], 0
        for count in request.page_counts:
            pages.append(list(request.page_ids[offset : offset + count]))
            offset += count
        rows = [_sampling_row(s) for s in request.sampling]
        chunks = [LocalChunk(list(c.token_ids), c.start, list(c.pages), _sampling_row(c.sampling), c.forced)
                  for c in request.chunks]
        with _rpc_errors(context), self._pools:
            try:
                queued = self._replica.prefill_local(chunks) if chunks else None
            except ValueError as exc:  # checked before anything runs: no programs, or a chunk they cannot run
                raise InvalidRequestError(str(exc)) from exc
            step = self._replica.dispatch(
                list(request.tokens), list(request.positions), pages, rows, list(request.forced)
            ) if rows else None
            reply = wpb.StepReply()
            if step is not None:
                sampled = self._replica.collect(step)
                reply = wpb.StepReply(
                    tokens=sampled.tokens.tolist(),
                    logprobs=sampled.logprobs.tolist(),
                    **_top_fields(sampled.top_ids, sampled.top_logprobs, any(r.num_top for r in rows)),
                )
            if queued is not None:
                reply.chunks.CopyFrom(_sampled_rows(self._replica.collect(queued), chunks))
            return reply

    def Reset(self, request: wpb.Empty, context: grpc.ServicerContext) -> wpb.Empty:
        self._require("decode", context)
        self.discard_state()
        return wpb.Empty()

    def discard_state(self) -> None:
        """Forget everything the front may have handed over (after a failed step, or an eviction the front
        has already failed its requests for): staged KV and, on decode, the pools' contents."""
        with self._lock:
            self._staged.clear()
        if self.role == "decode":
            with self._pools:
                self._replica.reset_pools()


def _settings(join: str, role: str, wait_s: float = 60.0) -> wpb.Settings:
    """Ask the front, retrying while it starts."""
    deadline = time.monotonic() + wait_s
    with grpc.insecure_channel(join) as channel:
        stub = wpb_grpc.ControlStub(channel)
        while True:
            try:
                return stub.GetSettings(wpb.SettingsRequest(role=role), timeout=5.0)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise WorkerStartError(f"cannot reach the front at {join}: {exc.details()}") from exc
                time.sleep(0.5)


def _build(opts: WorkerOptions, settings: wpb.Settings) -> tuple[WorkerService, str, str]:
    """Load, place and compile; returns the service, its fingerprint and a device description."""
    import jax
    import numpy as np
    from jax.sharding import Mesh
    from tqdm import tqdm

    from jdisagg.memory import resolve_kv_cache_dtype
    from jdisagg.meshes import PHASE_RULES, TP_AXIS, MeshSpec, check_fits, param_sharding_fn
    from jdisagg.models.loading import load_model
    from jdisagg.replicas import build_decode_replica, build_prefill_replica
    from jdisagg.sizes import ServingSizes
    from jdisagg.tokenizer import HFTokenizer
    from jdisagg.workers.handoff import ExpectedKV, KVReceiver, KVSender

    devices = jax.devices()
    if len(devices) < settings.tp:
        raise WorkerStartError(f"the {opts.role} role needs tp={settings.tp} devices, this process sees "
                               f"{len(devices)} (on CPU: drop XLA_FLAGS' device count, or set it to "
                               f"{settings.tp}; on GPUs: make {settings.tp} visible)")
    model = opts.model or settings.model or None
    try:
        tokenizer = HFTokenizer.from_file(opts.tokenizer) if opts.tokenizer else None
        source, _ = load_model(model, tokenizer, dtype=opts.dtype, platform=devices[0].platform)
        config = source.config
        check_fits(MeshSpec(settings.tp, 1), num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                   phase=opts.role)
        cache_dtype = resolve_kv_cache_dtype(opts.kv_cache_dtype, str(config.dtype))
    except ValueError as exc:
        raise WorkerStartError(str(exc)) from exc
    from flax import nnx

    mesh = Mesh(np.array(devices[: settings.tp]), (TP_AXIS,))
    heads = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads}
    # Each device reads only its slice of each param, straight into this role's sharding.
    shardings = param_sharding_fn(mesh, PHASE_RULES[opts.role], heads)
    graphdef, state = nnx.split(source.load(shardings, fuse=True))  # serving's fused projections
    kv_dtype = str(jax.tree.leaves(state)[0].dtype)  # the hand-off's: what prefill produces
    sizes = ServingSizes(settings.page_size, settings.max_batch, settings.max_context, settings.num_pages)
    if opts.role == "prefill":
        # The suffix cuts compile only when the front sends cached tokens (its prefix cache is on); the
        # worker's own cache of long prompts' leading chunks goes with it (None: its default budget).
        replica = build_prefill_replica(0, mesh, graphdef, state, sizes, suffix_handoff=settings.prefix_cache,
                                        prefill_cache_bytes=None if settings.prefix_cache else 0)
        offer_timeout = settings.offer_timeout_s if opts.offer_timeout is None else opts.offer_timeout
        sender = KVSender(opts.host, offer_timeout)
        service = WorkerService("prefill", replica, sender=sender)
    else:
        # prefill_local programs compile only when the front prefills prompts here (local_chunk > 0).
        replica = build_decode_replica(0, mesh, graphdef, state, sizes, settings.attention_backend or None,
                                       cache_dtype, local_chunk=settings.local_chunk)
        expected = ExpectedKV(config.num_layers, config.num_kv_heads, config.head_dim, kv_dtype,
                              sizes.prefill_buckets, sizes.chunk_capacity, sizes.page_size)
        receiver = KVReceiver(opts.host, mesh, replica.kv_sharding, expected)
        service = WorkerService("decode", replica, receiver=receiver)
    tasks = replica.compile_tasks()
    for _, run in tqdm(tasks, desc=f"compiling {opts.role}", disable=not opts.progress, unit="program"):
        run()
    pools = f", KV pages in {cache_dtype} ({sizes.num_pages} with scratch)" if opts.role == "decode" else ""
    log.info("%s worker: params in %s%s", opts.role, config.dtype, pools)
    device = f"{settings.tp} {devices[0].platform} device(s)"
    return service, fingerprint(config, kv_dtype, settings), device


def run_worker(opts: WorkerOptions) -> int:
    """Start, register, serve until SIGTERM/SIGINT (or the parent process dies). Raises WorkerStartError."""
    if opts.role not in ROLES:
        raise WorkerStartError(f"--role must be one of {ROLES}, got {opts.role!r}")
    if opts.cpus:
        os.sched_setaffinity(0, parse_cpus(opts.cpus))
    settings = _settings(opts.join, opts.role)
    from jdisagg.serving.devices import request_host_devices

    request_host_devices(max(opts.devices or settings.tp, settings.tp))
    from jdisagg.compile_cache import enable_compile_cache

    try:
        enable_compile_cache(opts.compile_cache)
    except ValueError as exc:
        raise WorkerStartError(str(exc)) from exc
    service, print_, device = _build(opts, settings)
    server = grpc.server(ThreadPoolExecutor(16, thread_name_prefix="worker-rpc"),
                         options=[("grpc.so_reuseport", 0)])
    wpb_grpc.add_WorkerServicer_to_server(service, server)
    try:
        port = server.add_insecure_port(f"{opts.host}:{opts.port}")
    except RuntimeError as exc:
        raise WorkerStartError(f"cannot listen on {opts.host}:{opts.port}: {exc}") from exc
    server.start()
    address = f"{opts.host}:{port}"
    membership = Membership(opts.join, wpb.RegisterRequest(
        role=opts.role, address=address, fingerprint=print_, device=device, pid=os.getpid()))
    try:
        slot = membership.register()
    except RegistrationRefused as exc:
        server.stop(0)
        membership.close()
        raise WorkerStartError(f"the front refused this worker: {exc}") from exc
    log.info("%s worker on %s is slot %d of the front at %s", opts.role, address, slot, opts.join)
    print(f"jdisagg worker: {opts.role} slot {slot} on {address}", flush=True)
    stop = threading.Event()
    membership.start(stop, service.discard_state)
    _wait_for_stop(opts.exit_with_parent, stop)
    stop.set()
    membership.close()
    server.stop(2.0).wait()
    return 0


def _wait_for_stop(exit_with_parent: bool, stop: threading.Event) -> None:
    handler: Callable[[int, Any], None] = lambda signum, frame: stop.set()  # noqa: E731
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    parent = os.getppid()
    while not stop.wait(0.5):
        if exit_with_parent and os.getppid() != parent:
            log.warning("parent process %d is gone: exiting", parent)
            return
