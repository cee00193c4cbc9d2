"""The ``jdisagg.v1.Generation`` service over one ``Engine``.

Each RPC runs in a server thread that consumes the engine's blocking stream. The engine is attached once it
has been built, so the server can answer health checks (NOT_SERVING) while the engine loads and compiles.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import grpc

from jdisagg.engine import Engine
from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.outputs import FinishReason, Output
from jdisagg.requests import RequestStream
from jdisagg.serving.convert import (
    prompt_of,
    reject_unknown_fields,
    response_of,
    sampling_params_of,
    unary_response_of,
)
from jdisagg.serving.wire import MalformedRequest, reject_wire_type_mismatches
from jdisagg.v1 import jdisagg_pb2 as pb
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

log = logging.getLogger("jdisagg.serving")


class GenerationService(pb_grpc.GenerationServicer):
    """Submits requests to the engine and maps its failures onto gRPC status codes."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._closing = False

    def attach(self, engine: Engine) -> None:
        """Start taking requests (until now every RPC got UNAVAILABLE)."""
        self._engine = engine

    def close(self) -> None:
        """Refuse new requests with UNAVAILABLE; those already submitted run to completion."""
        self._closing = True

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        stream, finished = self._submit(request, context)
        for chunk in stream:
            if chunk.finish_reason is None:
                yield response_of(chunk, None)
                continue
            finished()
            output = stream.result()
            _abort_on_error(output, context)
            yield response_of(chunk, output)

    def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateUnaryResponse:
        stream, finished = self._submit(request, context)
        output = stream.result()
        finished()
        _abort_on_error(output, context)
        return unary_response_of(output)

    def _submit(
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.ServicerContext
    ) -> tuple[RequestStream, Callable[[], None]]:
        engine = self._engine
        if engine is None or self._closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is starting up" if engine is None
                          else "server is shutting down")
        if isinstance(request, MalformedRequest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed GenerateRequest: {request.reason}")
        try:
            reject_wire_type_mismatches(request)
            reject_unknown_fields(request)
            stream = engine.submit(
                prompt_of(request),
                sampling_params_of(request.sampling),
                request_id=request.request_id if request.HasField("request_id") else None,
            )
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFullError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (EngineClosedError, WorkerUnavailableError) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return stream, _cancel_when_rpc_ends(stream, context)


def _cancel_when_rpc_ends(stream: RequestStream, context: grpc.ServicerContext) -> Callable[[], None]:
    """Abort the request if its RPC ends first (client cancel, deadline, disconnect).

    Otherwise the engine would keep generating for nobody and hold the KV pages until max_tokens. Returns a
    function the handler calls once the stream has finished, after which the callback does nothing: a late
    callback must not abort a newer request that reuses the same request id.
    """
    finished = threading.Event()

    def on_rpc_end() -> None:
        if not finished.is_set():
            stream.cancel()

    if not context.add_callback(on_rpc_end):  # the RPC is already over
        stream.cancel()
    return finished.set


def _abort_on_error(output: Output, context: grpc.ServicerContext) -> None:
    if output.finish_reason is FinishReason.ERROR:
        log.error("request %s failed: %s", output.request_id, output.error)
        code = grpc.StatusCode.UNAVAILABLE if output.error_code == "UNAVAILABLE" else grpc.StatusCode.INTERNAL
        context.abort(code, output.error or "the engine failed this request")
