"""The ``jdisagg`` command: help, flag errors, info, and a flag-less launch served and stopped for real.

Subprocesses get an environment without the test suite's device settings, so ``launch`` has to find its
8 virtual CPU devices by itself, as on a user's laptop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jdisagg.cli import main
from jdisagg.serving.client import make_request, wait_until_serving
from jdisagg.v1 import jdisagg_pb2 as pb
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

CLI = [sys.executable, "-m", "jdisagg.cli"]
DEFAULT_PORTS = (50051, 9400, 8000)  # gRPC, metrics, OpenAI-compatible HTTP
START_TIMEOUT_S = 600.0  # the default configuration compiles every bucket up to 1024 tokens


def _bare_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_PLATFORMS", None)
    return env


def _run(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_bare_env())


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("command", [[], ["launch"], ["generate"], ["info"]], ids=["jdisagg", "launch",
                                                                                   "generate", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: jdisagg {' '.join(command)}".rstrip())
    expected = {
        "launch": ["--prefill-mesh", "--decode-mesh", "--model", "--host", "--port", "--metrics-port",
                   "--max-batch", "--page-size", "--num-pages", "--max-context", "--max-queue", "--colocate",
                   "--attention-backend", "--drain-timeout"],
        "generate": ["--server", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop"],
        "info": ["--prefill-mesh", "--decode-mesh", "--colocate", "--model"],
    }.get(" ".join(command), ["launch", "generate", "info"])
    assert all(flag in text for flag in expected)


def test_cli_imports_without_jax():
    code = "import sys, jdisagg.cli; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_bad_flag_value_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--max-batch", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jdisagg: error: argument --max-batch") and err.count("\n") == 1


def test_impossible_mesh_is_one_line_exit_2():
    result = _run("launch", "--prefill-mesh", "9x1")
    assert result.returncode == 2
    assert result.stderr.startswith("jdisagg: error: prefill mesh 9x1") and "need 13 devices" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


# bfloat16 pages are 32768 bytes of the demo model (float32: 65536), so the budget holds 3 of them.
TOO_SMALL = "KV budget of 0.0001 GiB per decode device (kv_cache_gb=0.0001) holds 3 pages of 32768 bytes"


@pytest.mark.parametrize(("flags", "reason"), [
    (["--kv-cache-gb", "0.0001"], TOO_SMALL),
    (["--memory-fraction", "0.5"], "--memory-fraction is not supported with --processes"),
    (["--prefill-cache-gb", "1"], "--prefill-cache-gb is not supported with --processes"),
], ids=["kv-budget-too-small", "memory-fraction", "prefill-cache-budget"])
def test_processes_refuse_a_kv_budget_they_cannot_serve_in_one_line_exit_2(flags, reason):
    """Checked before any worker starts: the budget is counted in the dtypes the workers will serve in, and
    a budget the workers would not take is refused rather than ignored."""
    result = _run("launch", "--processes", "--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--max-context",
                  "128", "--dtype", "bfloat16", "--port", "0", "--metrics-port", "0", "--http-port", "0",
                  *flags)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"jdisagg: error: {reason}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


def test_info_prints_layout_and_shardings(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "prefill[0]: tp=4 devices [0,1,2,3]" in out and "decode[1]: tp=2 devices [6,7]" in out
    assert "layers/*/self_attn/q_proj/kernel" in out and "(-, tp)" in out


@pytest.fixture(scope="module")
def launched(tmp_path_factory, kv_page_watch) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``jdisagg launch`` with no flags at all, so on the default ports (its KV pages checked after each
    test through the metrics endpoint)."""
    taken = [p for p in DEFAULT_PORTS if _port_taken(p)]
    if taken:
        pytest.skip(f"default port(s) {taken} in use by another process")
    logs = tmp_path_factory.mktemp("launch")
    with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
        process = subprocess.Popen([*CLI, "launch"], stdout=out, stderr=err, env=_bare_env())
    try:
        wait_until_serving("127.0.0.1:50051", START_TIMEOUT_S)
    except TimeoutError as exc:
        process.kill()
        pytest.fail(f"{exc}\n{(logs / 'err').read_text(errors='replace')[-3000:]}")
    kv_page_watch.watch_metrics(f"http://127.0.0.1:{DEFAULT_PORTS[1]}/metrics")
    deadline = time.monotonic() + 60  # "serving on" is printed just after the health status turns SERVING
    while not (logs / "out").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield process, logs
    if process.poll() is None:
        process.kill()


def test_launch_without_flags_serves(launched):
    _, logs = launched
    assert (logs / "out").read_text() == "jdisagg: serving on 127.0.0.1:50051 (metrics on :9400)\n"
    log = (logs / "err").read_text(errors="replace")
    assert "devices: 8 cpu device(s)" in log and "prefill[0]: tp=4" in log and "decode[1]: tp=2" in log


def _unary(prompt: str, **sampling) -> pb.GenerateUnaryResponse:
    """The server's own answer over gRPC, to compare what the CLI prints with."""
    with grpc.insecure_channel(f"127.0.0.1:{DEFAULT_PORTS[0]}") as channel:
        return pb_grpc.GenerationStub(channel).GenerateUnary(make_request(prompt, **sampling), timeout=120)


def test_generate_streams_from_the_server(launched):
    """Seeded sampling is reproducible, so the streamed text must be exactly what the server returns."""
    result = _run("generate", "--max-tokens", "4", "--seed", "1", "--temperature", "0.5", "hello")
    assert result.returncode == 0, result.stderr
    expected = _unary("hello", max_tokens=4, seed=1, temperature=0.5)
    assert len(expected.token_ids) == 4 and expected.text
    assert result.stdout == expected.text + "\n" and result.stderr == ""


def test_generate_stop_cuts_the_printed_text(launched):
    """``--stop`` on a piece of the greedy text: printed up to it, the piece and what follows never are."""
    greedy = _unary("ROMEO:", max_tokens=40, temperature=0.0).text
    assert len(greedy) == 40 and greedy.isascii()  # byte-level demo model: one character per token
    at = next(i for i in range(12, 30) if greedy.index(greedy[i : i + 4]) == i)
    stop = greedy[at : at + 4]
    result = _run("generate", "--max-tokens", "40", "--temperature", "0", "--stop", stop, "ROMEO:")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy[:at] + "\n"


def test_generate_reports_grpc_errors(launched):
    result = _run("generate", "--max-tokens", "0", "hello")
    assert result.returncode == 1
    assert result.stderr.startswith("jdisagg: error: INVALID_ARGUMENT: max_tokens")
    assert result.stderr.count("\n") == 1


def test_sigterm_drains_and_exits_0(launched):
    """A stream in flight at SIGTERM still completes; requests arriving afterwards are turned away."""
    process, logs = launched
    with grpc.insecure_channel("127.0.0.1:50051") as channel:
        stub = pb_grpc.GenerationStub(channel)
        stream = stub.Generate(make_request("drain", max_tokens=200, ignore_eos=True), timeout=120)
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 200
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        with pytest.raises(grpc.RpcError) as err:
            stub.GenerateUnary(make_request("late"), timeout=30)
        # Turned away: by the closed service (UNAVAILABLE) or, if it lands while the server stops, by gRPC.
        turned_away = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert err.value.code() in turned_away, (err.value.code(), err.value.details())
    assert process.wait(timeout=60) == 0
    assert "draining" in (logs / "err").read_text(errors="replace")
