"""The front of a multi-process deployment: worker slots, the Control service, heartbeats, child workers.

The front runs the ordinary ``Engine`` (waiting queue, page tables, continuous batching, preemption,
detokenization, metrics) over ``RemotePrefillReplica``/``RemoteDecodeReplica`` slots: one slot per replica
of each mesh's DP. Workers join slots by registering (``jdisagg worker --join``, or children that
``jdisagg launch --processes`` spawns); a slot whose worker dies or stays silent too long goes dead and can
be joined again — by a new worker, or by the same one once it runs again (it learns of its eviction from
``CheckIn`` and registers anew).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from jdisagg.engine import Engine
from jdisagg.meshes import MeshSpec, check_fits
from jdisagg.sizes import ServingSizes
from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.v1 import worker_pb2_grpc as wpb_grpc
from jdisagg.workers.remote import RemoteDecodeReplica, RemotePrefillReplica, RemoteReplica
from jdisagg.workers.worker import fingerprint

log = logging.getLogger("jdisagg.front")


class ControlService(wpb_grpc.ControlServicer):
    """Hands out settings, takes registering workers into free slots of their role, answers check-ins."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._lock = threading.Lock()
        self._leases = itertools.count(1)
        # The dtype KV leaves prefill in (the params'): the one the front was given, else the first
        # worker's; every worker must match it.
        self.kv_dtype: str | None = None if front.dtype == "auto" else front.dtype

    def GetSettings(self, request: wpb.SettingsRequest, context: grpc.ServicerContext) -> wpb.Settings:
        if request.role not in ("prefill", "decode"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role!r}")
        return self._front.settings(request.role)

    def Register(self, request: wpb.RegisterRequest, context: grpc.ServicerContext) -> wpb.RegisterReply:
        front = self._front
        if request.role not in ("prefill", "decode"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown role {request.role!r}")
        got = json.loads(request.fingerprint)
        with self._lock:
            want = json.loads(fingerprint(front.config, self.kv_dtype or got.get("kv_dtype", ""),
                                          front.settings(request.role)))
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            if diff:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "layout mismatch, worker refused: "
                    + ", ".join(f"{k}={g} (front expects {w})" for k, (g, w) in sorted(diff.items())),
                )
            self.kv_dtype = want["kv_dtype"]
            slots: list[RemoteReplica] = front.prefill if request.role == "prefill" else front.decode
            # A worker registering again after an eviction takes its own slot back when it can.
            free = sorted((s for s in slots if not s.alive or s.address == request.address),
                          key=lambda s: s.address != request.address)
            if not free:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"all {len(slots)} {request.role} slots have a live worker")
            slot, lease = free[0], next(self._leases)
            slot.connect(request.address, request.pid, lease)
        log.info("%s worker %s (pid %d, %s) registered into slot %d", request.role, request.address,
                 request.pid, request.device, slot.index)
        return wpb.RegisterReply(slot=slot.index, lease=lease)

    def CheckIn(self, request: wpb.CheckInRequest, context: grpc.ServicerContext) -> wpb.CheckInReply:
        slots = self._front.prefill if request.role == "prefill" else self._front.decode
        held = 0 <= request.slot < len(slots) and slots[request.slot].alive \
            and slots[request.slot].lease == request.lease
        return wpb.CheckInReply(registered=held)


class Front:
    """Worker slots + Control server + heartbeats + the engine that schedules over them.

    Args:
        model: checkpoint directory every worker loads (the same path must exist on every host), or None.
        prefill / decode: mesh specs; DP is the number of worker slots, TP the devices per worker.
        rpc_timeout_s: deadline of one worker call (a decode step, a prefill).
        pull_timeout_s: deadline of one KV pull; also how long reserved pages wait for KV that never comes.
        offer_timeout_s: how long a prefill worker keeps KV offered that nobody pulls.
        heartbeat_s: interval of the liveness probe (each probe waits as long for its answer).
        evict_after_s: a worker that answers nothing for this long is evicted. A stall shorter than this
            (a GC pause, a busy host) only delays the streams on it; a longer one fails them with
            UNAVAILABLE, and the worker registers again once it runs. A refused connection evicts at once.
        dtype / kv_cache_dtype: what spawned workers serve params and KV pages in (``jdisagg worker
            --dtype/--kv-cache-dtype``); a worker whose params have another dtype than ``dtype`` is refused.
        prefix_cache: reuse the KV a decode worker already holds for a prompt's full-page prefix, so only
            the rest is handed off (prefill workers compile the programs that cut it; they learn it from
            the settings).
        local_prefill_tokens / step_token_budget: as ``Engine``'s (default 0: never). A prompt with at most
            this many uncached tokens is prefilled on its decode worker, in chunks carried by its ``Step``
            calls; decode workers compile the programs for it when the settings name a local chunk.
    """

    def __init__(
        self,
        model: str | None,
        prefill: MeshSpec,
        decode: MeshSpec,
        sizes: ServingSizes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        attention_backend: str | None = None,
        max_queue: int = 256,
        rpc_timeout_s: float = 60.0,
        pull_timeout_s: float = 30.0,
        offer_timeout_s: float = 60.0,
        heartbeat_s: float = 1.0,
        evict_after_s: float = 10.0,
        tokenizer_path: str | None = None,
        served_model_name: str | None = None,
        dtype: str = "auto",
        kv_cache_dtype: str = "auto",
        prefix_cache: bool = True,
        local_prefill_tokens: int = 0,
        step_token_budget: int = 512,
    ) -> None:
        from jdisagg.local_prefill import local_shape
        from jdisagg.metrics import model_name_of
        from jdisagg.serving.plan import model_config
        from jdisagg.tokenizer import HFTokenizer, load_tokenizer

        self.model = str(Path(model).resolve()) if model else None
        # Spawned workers get the same --tokenizer (they load the checkpoint the same way).
        self.tokenizer_path = str(Path(tokenizer_path).resolve()) if tokenizer_path else None
        tokenizer = (
            HFTokenizer.from_file(self.tokenizer_path) if self.tokenizer_path else load_tokenizer(self.model)
        )
        self.config = model_config(self.model)
        for spec, phase in ((prefill, "prefill"), (decode, "decode")):
            check_fits(spec, num_heads=self.config.num_heads, num_kv_heads=self.config.num_kv_heads,
                       phase=phase)
        self.specs = {"prefill": prefill, "decode": decode}
        self.sizes, self.attention_backend = sizes, attention_backend
        self.offer_timeout_s, self.prefix_cache = offer_timeout_s, prefix_cache
        self.dtype, self.kv_cache_dtype = dtype, kv_cache_dtype  # what spawned workers serve in
        self.prefill = [RemotePrefillReplica(i, rpc_timeout_s) for i in range(prefill.dp)]
        # The chunk an in-process decode replica of these sizes would take (the same programs, so the
        # same tokens); 0 when nothing is prefilled locally: the workers then compile no local programs.
        self.local_chunk = local_shape(sizes)[1] if local_prefill_tokens else 0
        self.decode = [RemoteDecodeReplica(i, sizes.num_pages, rpc_timeout_s, pull_timeout_s,
                                           local_chunk=self.local_chunk) for i in range(decode.dp)]
        self.control = ControlService(self)
        self._server = grpc.server(ThreadPoolExecutor(8, thread_name_prefix="control"),
                                   options=[("grpc.so_reuseport", 0)])
        wpb_grpc.add_ControlServicer_to_server(self.control, self._server)
        try:
            bound = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{port} for workers: {exc}") from exc
        self.address = f"{host}:{bound}"
        self._server.start()
        self.engine = Engine.from_replicas(
            self.config, tokenizer, self.prefill, self.decode, sizes=sizes, max_queue=max_queue,
            progress=False, served_model_name=served_model_name or model_name_of(self.model),
            prefix_cache=prefix_cache, local_prefill_tokens=local_prefill_tokens,
            step_token_budget=step_token_budget,
        )
        self._stop = threading.Event()
        for slot in self.slots:  # one prober per slot: a stalled worker must not delay the others' probes
            threading.Thread(target=self._heartbeat_loop, args=(slot, heartbeat_s, evict_after_s),
                             name=f"heartbeat-{slot.role}-{slot.index}", daemon=True).start()
        log.info("front: workers join at %s (%d prefill, %d decode slots)", self.address, prefill.dp,
                 decode.dp)

    def settings(self, role: str) -> wpb.Settings:
        s = self.sizes
        return wpb.Settings(
            model=self.model or "", page_size=s.page_size, num_pages=s.num_pages, max_context=s.max_context,
            max_batch=s.max_batch, attention_backend=self.attention_backend or "", tp=self.specs[role].tp,
            offer_timeout_s=self.offer_timeout_s, prefix_cache=self.prefix_cache,
            local_chunk=self.local_chunk if role == "decode" else 0,
        )

    @property
    def slots(self) -> list[RemoteReplica]:
        return [*self.prefill, *self.decode]

    def wait_until_full(self, timeout_s: float, children: list[subprocess.Popen] | None = None) -> None:
        """Block until every slot has a live worker. Raises RuntimeError on timeout or a child's death."""
        self._wait_for(self.slots, len(self.slots), timeout_s, children)

    def wait_until_registered(
        self, role: str, count: int, timeout_s: float, children: list[subprocess.Popen] | None = None
    ) -> None:
        """Block until ``count`` slots of ``role`` have a live worker (e.g. the first one, whose compiled
        programs the others then load from the cache). Raises as ``wait_until_full``."""
        self._wait_for([s for s in self.slots if s.role == role], count, timeout_s, children)

    def _wait_for(
        self, slots: list[RemoteReplica], count: int, timeout_s: float,
        children: list[subprocess.Popen] | None,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(s.alive for s in slots) < count:
            for child in children or []:
                if child.poll() is not None:
                    raise RuntimeError(f"worker process {child.pid} exited with {child.returncode} before "
                                       "registering (its log says why)")
            if time.monotonic() > deadline:
                missing = [f"{s.role} {s.index}" for s in slots if not s.alive]
                raise RuntimeError(f"no worker registered for {', '.join(missing)} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def _heartbeat_loop(self, slot: RemoteReplica, interval: float, evict_after: float) -> None:
        while not self._stop.wait(interval):
            if not slot.alive or slot.heartbeat(timeout_s=interval):
                continue
            silent = time.monotonic() - slot.last_seen
            if silent >= evict_after:
                slot.mark_dead(f"silent for {silent:.1f} s (evicted after {evict_after:g} s)")

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.engine.shutdown(drain=drain, timeout=timeout)
        self._stop.set()
        self._server.stop(1.0)


def spawn_workers(
    front: Front,
    *,
    devices_per_worker: int | None = None,
    cpus: dict[str, str] | None = None,
    log_dir: Path | None = None,
    progress: bool = False,
    compile_cache: str | None = None,
    env_overrides: dict[str, str | None] | None = None,
) -> list[subprocess.Popen]:
    """Start one child process per slot, each owning its own devices (``jdisagg worker --join``).

    On CPU a child splits the host into ``devices_per_worker`` virtual devices (default: its role's tp);
    ``cpus`` pins each role's children to cores (``{"prefill": "0", "decode": "1"}``). On GPUs each child
    sees only its own ``tp`` GPUs (``CUDA_VISIBLE_DEVICES``), handed out in slot order. ``env_overrides``
    set (or, as None, remove) variables of the children's environment, e.g. JAX_PLATFORMS when this process
    pinned its own.
    """
    children = []
    gpu = 0
    for slot in front.slots:
        tp = front.specs[slot.role].tp
        env = dict(os.environ)
        for name, value in (env_overrides or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        flags = env.get("XLA_FLAGS", "").split()
        env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu + i) for i in range(tp))
        gpu += tp
        command = [sys.executable, "-m", "jdisagg.cli", "worker", "--role", slot.role,
                   "--join", front.address, "--devices", str(devices_per_worker or tp), "--exit-with-parent"]
        if not progress:
            command.append("--no-progress")
        if cpus and cpus.get(slot.role):
            command += ["--cpus", cpus[slot.role]]
        if front.tokenizer_path:
            command += ["--tokenizer", front.tokenizer_path]
        command += ["--dtype", front.dtype, "--kv-cache-dtype", front.kv_cache_dtype]
        if compile_cache is not None:
            command += ["--compile-cache", compile_cache]
        out = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            out = open(log_dir / f"{slot.role}-{slot.index}.log", "w")  # noqa: SIM115 - child owns it
        err = subprocess.STDOUT if out else None
        children.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    return children


def stop_workers(children: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
