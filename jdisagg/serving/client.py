"""Client helpers shared by ``jdisagg generate`` and the tests: build requests, wait for a server."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jdisagg.v1 import jdisagg_pb2 as pb

_POLL_S = 0.5


def make_request(
    prompt: str | Sequence[int],
    *,
    request_id: str | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    **sampling: float | int | bool | None,
) -> pb.GenerateRequest:
    """A request for text or token ids. Sampling knobs left at None stay unset: server defaults apply."""
    params = pb.SamplingParams(
        stop=stop, stop_token_ids=stop_token_ids, **{k: v for k, v in sampling.items() if v is not None}
    )
    request = pb.GenerateRequest(sampling=params, request_id=request_id)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.SetInParent()  # an empty list still selects token_ids (and is then rejected)
        request.token_ids.ids.extend(prompt)
    return request


def wait_until_serving(target: str, timeout: float) -> None:
    """Poll the standard health service until the server reports SERVING.

    A server answers NOT_SERVING (or refuses connections) while its engine compiles, which can take minutes.
    Raises ``TimeoutError`` with the last status seen.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(_POLL_S)
    raise TimeoutError(f"{target} did not report SERVING within {timeout:.0f} s (last: {last})")
