"""``jdisagg bench``: its workload and statistics, and a real run against a real server on loopback."""

from __future__ import annotations

import math
import socket
import statistics
import subprocess
import sys

import pytest

from jdisagg.bench import (
    BenchOptions,
    Lengths,
    Record,
    Workload,
    arrival_offsets,
    make_requests,
    percentiles,
    run_bench,
    summarize,
)
from jdisagg.chat_template import ChatTemplate
from jdisagg.engine import Engine
from jdisagg.serving.openai.server import HTTPServer
from jdisagg.serving.server import GenerationServer

MIXED = Workload(Lengths(8, 24), Lengths(4, 12), 0.25, Lengths(64, 96), Lengths(2, 2))


def test_lengths_parse_fixed_and_ranges():
    assert Lengths.parse("32") == Lengths(32, 32)
    assert Lengths.parse("16:64") == Lengths(16, 64)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)


def test_workload_is_seeded_and_mixes_long_prompts():
    a, b, c = (make_requests(MIXED, 400, seed) for seed in (1, 1, 2))
    assert a == b and a != c
    long = [r for r in a if r.long]
    assert 0.15 < len(long) / len(a) < 0.35
    assert all(64 <= len(r.prompt_ids) <= 96 and r.max_tokens == 2 for r in long)
    assert all(8 <= len(r.prompt_ids) <= 24 and 4 <= r.max_tokens <= 12 for r in a if not r.long)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_asked_rate_and_burstiness(burstiness):
    offsets = arrival_offsets(4000, rate=8.0, burstiness=burstiness, seed=0)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.1)
    cv2 = statistics.pvariance(gaps) / statistics.fmean(gaps) ** 2  # gamma: 1 / shape
    assert cv2 == pytest.approx(1 / burstiness, rel=0.2)
    assert arrival_offsets(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


def test_statistics_of_hand_built_records():
    fast = Record(sent=0.0, long=False, prompt_tokens=4, token_times=[0.1, 0.2, 0.3], done=0.3)
    slow = Record(sent=0.0, long=True, prompt_tokens=8, token_times=[1.0, 1.5], done=1.5)
    failed = Record(sent=0.0, long=False, prompt_tokens=4, status="UNAVAILABLE", done=0.1)
    s = summarize([fast, slow, failed], duration=2.0, slo_ttft_ms=500, slo_tpot_ms=200)
    assert s["succeeded"] == 2 and s["failed"] == {"UNAVAILABLE": 1}
    assert s["ttft_ms"]["mean"] == pytest.approx(550) and s["ttft_ms"]["p99"] == pytest.approx(1000)
    assert s["tpot_ms"]["p50"] == pytest.approx(100) and s["tpot_ms"]["p99"] == pytest.approx(500)
    assert s["output_token_throughput"] == pytest.approx(2.5)
    assert s["goodput"] == pytest.approx(0.5)  # only `fast` meets both SLOs
    assert s["by_prompt"]["short"]["tpot_ms"]["p99"] == pytest.approx(100)
    assert s["by_prompt"]["long"]["tpot_ms"]["p99"] == pytest.approx(500)
    assert summarize([fast], duration=1.0, slo_ttft_ms=None, slo_tpot_ms=None)["by_prompt"] is None
    assert percentiles([]) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["grpc", "openai"])
def test_bench_against_a_live_server_counts_every_request_on_both_sides(live_server, backend):
    grpc_target, base_url, metrics_url = live_server
    summary = run_bench(BenchOptions(
        grpc_target, MIXED, num_requests=16, rate=50.0, burstiness=0.5, warmup=2, seed=3, slo_tpot_ms=1e6,
        metrics_url=metrics_url, progress=False, backend=backend, base_url=base_url,
    ))
    requests = make_requests(MIXED, 18, 3)[2:]
    assert summary["succeeded"] == 16 and not summary["failed"]
    assert summary["output_tokens"] == sum(r.max_tokens for r in requests)
    tokens_per_s = summary["output_tokens"] / summary["duration_s"]
    assert summary["output_token_throughput"] == pytest.approx(tokens_per_s)
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    # The server's histograms saw exactly the measured requests (warm-up excluded on both sides).
    assert summary["server_requests"] == {"ttft_ms": 16, "tpot_ms": 16, "e2e_ms": 16}
    assert all(ratio > 0 for ratio in summary["server_over_client"].values())


@pytest.fixture(scope="module")
def live_server():
    """One engine behind both fronts: gRPC (with metrics) and the OpenAI-compatible HTTP API. Its sizes are
    tests/test_stop_strings.py's, so the later of the two loads its programs from the suite's compile
    cache."""
    with Engine(prefill_mesh="2x1", decode_mesh="1x2", max_batch=4, max_context=128,
                progress=False) as engine:
        server = GenerationServer("127.0.0.1", 0, 64)
        metrics_port = _free_port()
        server.serve(engine, "127.0.0.1", metrics_port)
        http = HTTPServer("127.0.0.1", 0, "demo", ChatTemplate.for_model(None))
        http.serve(engine)
        try:
            yield (f"127.0.0.1:{server.port}", f"http://127.0.0.1:{http.port}/v1",
                   f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            http.shutdown()
            server.shutdown(None, 1.0)


def test_bench_cli_rejects_bad_lengths_with_one_line():
    run = subprocess.run([sys.executable, "-m", "jdisagg.cli", "bench", "--prompt-len", "9:3"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["jdisagg: error: lengths '9:3': want N or LOW:HIGH with 1 <= "
                                               "LOW <= HIGH"]
