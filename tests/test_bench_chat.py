"""``jdisagg bench --workload chat``: conversations that grow turn by turn, and a real run against a server
whose prefix cache the workload exercises (hit rate and handed-off KV from the server's own counters)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from jdisagg.bench import BenchOptions, Lengths, Record, Workload
from jdisagg.bench_chat import ChatWorkload, conversations, run_chat_bench
from jdisagg.engine import Engine
from jdisagg.serving.server import GenerationServer

CHAT = ChatWorkload(conversations=3, turns=3, system_prompt=40, message=Lengths(4, 8), output=Lengths(4, 4))


def test_conversations_share_the_system_prompt_and_repeat_their_history():
    a, b = conversations(CHAT, seed=5), conversations(CHAT, seed=5)
    first = [c.next_request() for c in a]
    assert first == [c.next_request() for c in b]  # seeded
    assert len({tuple(r.prompt_ids[:40]) for r in first}) == 1  # one system prompt for all
    assert len({tuple(r.prompt_ids) for r in first}) == 3  # each with its own message
    answer = Record(sent=0.0, long=False, prompt_tokens=0, token_ids=[7, 7, 7, 7])
    a[0].answered(answer)
    second = a[0].next_request()
    assert second.prompt_ids[: len(first[0].prompt_ids) + 4] == first[0].prompt_ids + [7, 7, 7, 7]
    assert 4 <= len(second.prompt_ids) - len(first[0].prompt_ids) - 4 <= 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_against_a_live_server_hits_the_prefix_cache_and_hands_off_less():
    # test_bench's and test_stop_strings' engine (three conversations need no more than 4 slots), so a
    # whole-suite run loads every program from its compile cache.
    layout = dict(prefill_mesh="2x1", decode_mesh="1x2", max_batch=4, max_context=128)
    with Engine(**layout, progress=False) as engine:
        server, metrics_port = GenerationServer("127.0.0.1", 0, 64), _free_port()
        server.serve(engine, "127.0.0.1", metrics_port)
        try:
            summary = run_chat_bench(BenchOptions(
                f"127.0.0.1:{server.port}", Workload(CHAT.output, CHAT.output), seed=1, progress=False,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"), CHAT)
        finally:
            server.shutdown(None, 1.0)
    assert summary["succeeded"] == summary["requests"] == 9 and not summary["failed"]
    assert summary["output_tokens"] == 9 * 4
    counters = summary["server_counters"]
    # Every measured prompt was looked up once. Turn 1's three prompts ran at once on an empty cache; each
    # later turn finds at least its conversation's first prompt's two full pages.
    assert counters["queried_tokens"] == 9 * summary["prompt_tokens_per_request"]
    assert counters["hit_tokens"] >= 6 * 32
    assert 0 < summary["hit_rate"] < 1
    # Disaggregated, every prompt is prefilled remotely, and only the KV past its cached prefix is handed off.
    assert counters["remote_prefills"] == 9 and counters["local_prefills"] == 0
    assert counters["kv_transfer_tokens"] == counters["queried_tokens"] - counters["hit_tokens"]
    assert summary["turns"]["first"] and summary["turns"]["later"]


def test_bench_cli_chat_rejects_bad_message_lengths_with_one_line():
    run = subprocess.run([sys.executable, "-m", "jdisagg.cli", "bench", "--workload", "chat", "--message-len",
                          "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["jdisagg: error: lengths '0': want N or LOW:HIGH with 1 <= "
                                               "LOW <= HIGH"]


@pytest.mark.parametrize("flag", ["--conversations", "--turns"])
def test_bench_cli_chat_rejects_zero_conversations_or_turns(flag):
    run = subprocess.run([sys.executable, "-m", "jdisagg.cli", "bench", "--workload", "chat", flag, "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
