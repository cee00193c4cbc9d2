"""The gRPC server end to end: a real ``jdisagg launch`` subprocess against an in-process ``Engine``.

The server compiles while the in-process reference engine compiles, so the module pays for about one
compile; the reference has one decode replica of the server's TP degree (a request's tokens do not depend
on which replica or batch runs it) and no prefix cache (the prompts fill no page), so it compiles less.
A second, tiny server (one device per phase, room for one waiting request) covers queue-full.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jdisagg.engine import Engine
from jdisagg.errors import EngineClosedError, QueueFullError
from jdisagg.outputs import FinishReason, Output, RequestMetrics, StreamChunk
from jdisagg.requests import RequestStream
from jdisagg.sampling_params import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    SamplingParams,
)
from jdisagg.serving.client import make_request, wait_until_serving
from jdisagg.serving.convert import FINISH_REASONS
from jdisagg.serving.server import GenerationServer
from jdisagg.v1 import jdisagg_pb2 as pb
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

SETTINGS = {"prefill_mesh": "4x1", "decode_mesh": "2x2", "max_context": 128, "num_pages": 64, "max_batch": 8}
START_TIMEOUT_S = 300.0
RPC_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``jdisagg launch`` subprocess; logs go to files so a full pipe can never stall it."""

    def __init__(self, log_dir: Path, **flags: object) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.target = f"127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "jdisagg.cli", "launch", "--no-progress", "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--http-port", "0"]
        for name, value in flags.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self._stderr = log_dir / f"server-{self.port}.err"
        with open(self._stderr, "wb") as err, open(log_dir / f"server-{self.port}.out", "wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, env=os.environ.copy())
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def wait_ready(self) -> None:
        try:
            wait_until_serving(self.target, START_TIMEOUT_S)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self._stderr.read_text(errors="replace")[-3000:]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples with these labels, as scraped from the metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def wait_metric(self, name: str, predicate, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while not predicate(value := self.metric(name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return value

    def stop(self) -> int:
        self.channel.close()
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("server"), **SETTINGS)
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def engine(server) -> Iterator[Engine]:
    """Built while the server subprocess compiles the same programs."""
    eng = Engine(None, progress=False, **{**SETTINGS, "decode_mesh": "2x1"}, prefix_cache=False)
    server.wait_ready()
    yield eng
    eng.shutdown(drain=False)


@pytest.fixture(scope="module")
def stub(server, engine) -> pb_grpc.GenerationStub:
    return server.stub


def _aborted(server: Server) -> float:
    return server.metric("jdisagg_requests_total", outcome="abort")


PROMPTS = ["ROMEO:", [72, 101, 108, 108, 111, 44, 32, 119]]
PARAMS = [
    {"max_tokens": 12, "ignore_eos": True},
    {"max_tokens": 12, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7, "ignore_eos": True},
]


@pytest.mark.parametrize("sampling", PARAMS, ids=["greedy", "seeded"])
def test_stream_and_unary_match_engine(stub, engine, sampling):
    expected = engine.generate(PROMPTS, SamplingParams(**sampling))
    for prompt, want in zip(PROMPTS, expected, strict=True):
        request = make_request(prompt, **sampling)
        chunks = list(stub.Generate(request, timeout=RPC_TIMEOUT_S))
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == FINISH_REASONS[want.finish_reason]
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(want.prompt_token_ids), 12)
        assert last.usage.ttft_seconds > 0

        unary = stub.GenerateUnary(request, timeout=RPC_TIMEOUT_S)
        assert list(unary.token_ids) == want.token_ids
        assert unary.text == want.text
        assert unary.finish_reason == FINISH_REASONS[want.finish_reason]


def test_32_concurrent_streams_complete(stub):
    def run(i: int) -> list[pb.GenerateResponse]:
        request = make_request(f"stream {i}:", max_tokens=8, temperature=1.0, seed=i, ignore_eos=True)
        return list(stub.Generate(request, timeout=RPC_TIMEOUT_S))

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(run, range(32)))
    for chunks in results:
        assert chunks[-1].finish_reason == FINISH_REASONS[FinishReason.LENGTH]
        assert sum(len(c.token_ids) for c in chunks) == 8


def test_cancel_mid_stream_frees_pages(server, stub):
    aborted = _aborted(server)
    call = stub.Generate(make_request("cancel me", max_tokens=100, ignore_eos=True), timeout=RPC_TIMEOUT_S)
    next(call)
    next(call)
    call.cancel()
    assert server.wait_metric("jdisagg_kv_pages_used", lambda v: v == 0) == 0
    assert _aborted(server) == aborted + 1


def test_deadline_frees_pages(server, stub):
    """The deadline is a third of the request's undisturbed run time, so it expires mid-generation."""
    request = make_request("too slow", max_tokens=110, ignore_eos=True)
    start = time.monotonic()
    stub.GenerateUnary(request, timeout=RPC_TIMEOUT_S)
    deadline = (time.monotonic() - start) / 3
    aborted = _aborted(server)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request, timeout=deadline))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.wait_metric("jdisagg_kv_pages_used", lambda v: v == 0) == 0
    assert _aborted(server) == aborted + 1


BAD_REQUESTS = {
    "empty prompt": make_request(""),
    "no input": pb.GenerateRequest(),
    "empty token ids": make_request([]),
    "prompt longer than the context": make_request("x" * 200),
    "max_tokens 0": make_request("hi", max_tokens=0),
    "max_tokens negative": make_request("hi", max_tokens=-3),
    "temperature negative": make_request("hi", temperature=-0.5),
    "top_p 0": make_request("hi", top_p=0.0),
    "top_p above 1": make_request("hi", top_p=1.5),
    "token id out of vocabulary": make_request([1, 2, 1_000_000]),
    "negative token id": make_request([1, -1]),
    "temperature +inf": make_request("hi", temperature=float("inf")),
    "temperature 1e308": make_request("hi", temperature=1e308),
    "temperature above the bound": make_request("hi", temperature=MAX_TEMPERATURE * 1.01),
    "too many stop strings": make_request("hi", stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
    "stop string too long": make_request("hi", stop=["x" * (MAX_STOP_STRING_CHARS + 1)]),
    "too many stop ids": make_request("hi", stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))),
}


@pytest.mark.parametrize("request_", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_is_invalid_argument(stub, request_):
    for rpc in (stub.GenerateUnary, lambda r, timeout: list(stub.Generate(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request_, timeout=RPC_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details()


UNKNOWN_FIELD = b"\xf8\x3f\x01"  # field 1023, varint 1
IN_SAMPLING = b"\x1a\x03" + UNKNOWN_FIELD  # a second `sampling` (field 3), merged into the first


@pytest.mark.parametrize("extra", [UNKNOWN_FIELD, IN_SAMPLING], ids=["top-level", "in sampling"])
def test_unknown_fields_are_invalid_argument(server, stub, extra):
    """Raw bytes: a valid request plus field 1023, at the top or in a second ``sampling`` (field 3), which
    protobuf merges into the first."""
    raw = make_request("hi", max_tokens=2).SerializeToString() + extra
    call = server.channel.unary_unary("/jdisagg.v1.Generation/GenerateUnary")
    with pytest.raises(grpc.RpcError) as err:
        call(raw, timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1023" in err.value.details()


VALID = make_request("hi", max_tokens=2).SerializeToString()
MALFORMED_BODIES = {
    # field 1 (text), 2 bytes that are not UTF-8
    "text not UTF-8": (b"\x0a\x02\xff\xfe", "String field had bad UTF-8"),
    "truncated": (VALID[:-1], "Wire format was corrupt"),
    # sampling (field 3) holding temperature (field 2, a double) sent as a varint
    "wire-type mismatch": (VALID + b"\x1a\x02\x10\x01",
                           "sampling.temperature (field 2) arrived with wire type varint, expected 64-bit"),
}


@pytest.mark.parametrize(("body", "phrase"), MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_malformed_body_is_invalid_argument_without_a_traceback(server, stub, body, phrase):
    unary = server.channel.unary_unary("/jdisagg.v1.Generation/GenerateUnary")
    stream = server.channel.unary_stream("/jdisagg.v1.Generation/Generate")
    for rpc in (lambda: unary(body, timeout=RPC_TIMEOUT_S),
                lambda: list(stream(body, timeout=RPC_TIMEOUT_S))):
        with pytest.raises(grpc.RpcError) as err:
            rpc()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert phrase in err.value.details()
        assert len(err.value.details()) < 200
    log = server.log_tail()
    assert "Traceback" not in log and "deserializing" not in log, log


def test_the_largest_allowed_inputs_are_served(stub):
    stops = ["\x00" * MAX_STOP_STRING_CHARS] * (MAX_STOP_STRINGS - 1) + ["e"]
    request = make_request("ROMEO:", max_tokens=40, stop=stops,
                           stop_token_ids=list(range(128, 128 + MAX_STOP_TOKEN_IDS)))
    reply = stub.GenerateUnary(request, timeout=RPC_TIMEOUT_S)
    assert reply.finish_reason == pb.FINISH_REASON_STOP and "e" not in reply.text, reply
    hot = stub.GenerateUnary(make_request("hi", max_tokens=2, temperature=MAX_TEMPERATURE, ignore_eos=True),
                             timeout=RPC_TIMEOUT_S)
    assert len(hot.token_ids) == 2


def test_still_serving_after_bad_input(stub):
    reply = stub.GenerateUnary(make_request("fine", max_tokens=3, ignore_eos=True), timeout=RPC_TIMEOUT_S)
    assert len(reply.token_ids) == 3


def test_health_reports_serving(server, stub):
    """The server sets "" and then the service's name, and the fixture waited for "" only: a check that
    lands between the two sets reads both again, and by then both must say SERVING."""
    health = health_pb2_grpc.HealthStub(server.channel)
    for _ in range(2):
        statuses = [health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S).status
                    for service in ("", "jdisagg.v1.Generation")]
        if set(statuses) == {health_pb2.HealthCheckResponse.SERVING}:
            break
        time.sleep(0.1)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2, statuses


def test_reflection_lists_the_service(server, stub):
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT_S
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"jdisagg.v1.Generation", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted(tmp_path_factory):
    """One decode replica with pages for one 40-token prompt and room for one waiting request: a burst of
    such requests leaves one running, one waiting and the rest refused."""
    small = Server(tmp_path_factory.mktemp("small"), prefill_mesh="1x1", decode_mesh="1x1", max_batch=1,
                   max_context=64, num_pages=5, max_queue=1)
    try:
        small.wait_ready()
        request = make_request("q" * 40, max_tokens=20, ignore_eos=True)

        def run(_: int) -> grpc.StatusCode:
            try:
                small.stub.GenerateUnary(request, timeout=RPC_TIMEOUT_S)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(run, range(8)))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert run(0) == grpc.StatusCode.OK
    finally:
        assert small.stop() == 0, small.log_tail()


class _FailingEngine:
    """Stands in for an engine to drive the error paths a healthy engine cannot be made to take."""

    def live_replicas(self) -> dict[str, int]:
        return {"prefill": 1, "decode": 1}

    def submit(self, prompt, params, *, request_id=None) -> RequestStream:
        if prompt == "full":
            raise QueueFullError("admission queue is full (1 waiting)")
        if prompt == "closed":
            raise EngineClosedError("engine is shutting down")
        stream = RequestStream("r", lambda _: False)
        output = Output("r", [1], [], "", FinishReason.ERROR, RequestMetrics(arrival=0.0), "XlaError: boom")
        stream.complete(output)
        stream.deliver(StreamChunk("r", [], "", FinishReason.ERROR, output.error))
        return stream


@pytest.mark.parametrize(("prompt", "code"), [
    ("full", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("closed", grpc.StatusCode.UNAVAILABLE),
    ("fails", grpc.StatusCode.INTERNAL),
])
def test_engine_errors_map_to_status_codes(prompt, code):
    frontend = GenerationServer("127.0.0.1", 0, max_workers=4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.GenerateUnary(make_request(prompt), timeout=RPC_TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no engine attached yet
            frontend.serve(_FailingEngine(), "127.0.0.1", 0)
            for rpc in (stub.GenerateUnary, lambda r, timeout: list(stub.Generate(r, timeout=timeout))):
                with pytest.raises(grpc.RpcError) as err:
                    rpc(make_request(prompt), timeout=RPC_TIMEOUT_S)
                assert err.value.code() == code
    finally:
        frontend.shutdown(None, grace=1.0)
