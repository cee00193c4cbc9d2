"""The gRPC server around one engine: Generation, health, reflection, metrics, graceful shutdown.

The server starts *before* the engine is built so that health checks answer (NOT_SERVING) during the
minutes of loading and compiling, and a port that is already taken is reported before that wait. Once
serving, health means "can serve now": NOT_SERVING while no prefill or no decode worker is alive, so a load
balancer stops routing here, and SERVING again when one returns.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from jdisagg.engine import Engine
from jdisagg.serving.service import GenerationService
from jdisagg.serving.wire import parse_generate_request
from jdisagg.v1 import jdisagg_pb2 as pb

log = logging.getLogger("jdisagg.serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server, what most probes ask about
CAPACITY_POLL_S = 0.25  # how often health re-reads the live workers per role


def host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, as gRPC targets want."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GenerationServer:
    """Owns the gRPC server, its health status and the metrics endpoint; the engine is attached later.

    Args:
        host / port: where to listen; port 0 picks a free one (see ``port``).
        max_workers: handler threads. Each streaming RPC holds one for its whole life, so this should cover
            every request the engine can hold (queued + running); more RPCs than this wait invisibly in
            gRPC's executor instead of meeting the engine's admission control.
    """

    def __init__(self, host: str, port: int, max_workers: int) -> None:
        self.service = GenerationService()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # SO_REUSEPORT off: a second server on a taken port must fail to bind, not share the port.
        self._server = grpc.server(ThreadPoolExecutor(max_workers, thread_name_prefix="rpc"),
                                   options=[("grpc.so_reuseport", 0)])
        _add_generation_service(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        try:
            self.port = self._server.add_insecure_port(host_port(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host_port(host, port)}: {exc}") from exc
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._metrics: WSGIServer | None = None
        self._stopping = threading.Event()
        self._server.start()

    def serve(self, engine: Engine, metrics_host: str, metrics_port: int) -> None:
        """Expose ``engine`` (and its metrics on ``metrics_port`` unless 0) and report SERVING."""
        if metrics_port:
            self._metrics, _ = start_http_server(
                metrics_port, addr=metrics_host, registry=engine.metrics.registry
            )
        self.service.attach(engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._follow_capacity, args=(engine,), name="health", daemon=True).start()

    def _follow_capacity(self, engine: Engine) -> None:
        """SERVING exactly while every role has a live replica; each change is logged with its reason."""
        serving = True
        while not self._stopping.wait(CAPACITY_POLL_S):
            live = engine.live_replicas()
            missing = [role for role, count in live.items() if not count]
            if bool(missing) != serving:
                continue
            serving = not missing
            if missing:
                log.warning("health: NOT_SERVING: no live %s worker", " and no live ".join(missing))
            else:
                log.info("health: SERVING again (%s)", ", ".join(f"{n} {role}" for role, n in live.items()))
            self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                             else health_pb2.HealthCheckResponse.NOT_SERVING)

    def shutdown(self, engine: Engine | None, grace: float) -> None:
        """Drain: NOT_SERVING, refuse new requests, finish those in flight (up to ``grace`` s), stop."""
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.service.close()
        if engine is not None:
            engine.shutdown(drain=True, timeout=grace)
        self._server.stop(grace).wait()
        if self._metrics is not None:
            self._metrics.shutdown()

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in _HEALTH_SERVICES:
            self.health.set(name, status)


def _add_generation_service(service: GenerationService, server: grpc.Server) -> None:
    """Register ``jdisagg.v1.Generation`` with our own request parser (``jdisagg.serving.wire``) instead of
    the generated one, so a malformed body reaches the service as INVALID_ARGUMENT, not INTERNAL."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "GenerateUnary": grpc.unary_unary_rpc_method_handler(
            service.GenerateUnary, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateUnaryResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
