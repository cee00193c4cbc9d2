"""README's health claim: a launched server answers health checks at once, NOT_SERVING until its engine
has compiled every program, and turns generation away meanwhile; then SERVING, and it generates.

A real ``jdisagg launch`` subprocess with the demo model and a small context (few programs to compile).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jdisagg.serving.client import make_request
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

START_TIMEOUT_S = 300.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_not_serving_until_warm_up_ends(tmp_path):
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    # The compile cache is off so that warm-up really compiles, however often the suite ran before.
    args = [sys.executable, "-m", "jdisagg.cli", "launch", "--no-progress", "--port", str(port),
            "--metrics-port", str(metrics_port), "--http-port", str(http_port), "--compile-cache", "off",
            "--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--max-context", "32", "--max-batch", "1"]
    with open(tmp_path / "err", "wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=os.environ.copy())
    seen: list[int] = []
    refused_while_warming: list[grpc.StatusCode] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            generation = pb_grpc.GenerationStub(channel)
            deadline = time.monotonic() + START_TIMEOUT_S
            while SERVING not in seen:
                if process.poll() is not None or time.monotonic() > deadline:  # a hang guard, not a timing
                    pytest.fail(f"no SERVING (health so far {seen}); server log tail:\n"
                                + (tmp_path / "err").read_text(errors="replace")[-3000:])
                try:
                    seen.append(health.Check(health_pb2.HealthCheckRequest(), timeout=2.0).status)
                except grpc.RpcError:  # not listening yet
                    time.sleep(0.02)
                    continue
                if seen[-1] == NOT_SERVING and not refused_while_warming:
                    try:
                        generation.GenerateUnary(make_request("hi", max_tokens=1), timeout=10.0)
                    except grpc.RpcError as exc:
                        refused_while_warming.append(exc.code())
            reply = generation.GenerateUnary(make_request("hi", max_tokens=2), timeout=60.0)
    finally:
        process.terminate()
        code = process.wait(timeout=60)
    assert seen[0] == NOT_SERVING and set(seen) == {NOT_SERVING, SERVING}
    assert seen.index(SERVING) == len(seen) - 1  # never back to NOT_SERVING once serving
    assert refused_while_warming == [grpc.StatusCode.UNAVAILABLE]
    assert len(reply.token_ids) == 2
    assert code == 0
