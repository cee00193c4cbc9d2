"""The multi-turn chat workload of ``jdisagg bench --workload chat``: the traffic a prefix cache is for.

``conversations`` run at once, each ``turns`` long. Turn 1's prompt is a system prompt shared by every
conversation plus a user message; turn t's prompt is turn t-1's prompt, the answer the server streamed back
(its token ids) and a new message. Every prompt after a conversation's first repeats all of it, and all
conversations share the system prompt, so a server with a prefix cache computes and hands off only the new
message and the last answer: TTFT should fall with the cached share of the prompt, and KV bytes handed off
per request with the uncached suffix. A user waits for each answer, so a conversation's turns are
sequential; conversations are concurrent.

Reported, besides the usual latencies: TTFT of first turns against later turns, and, from the server's
metrics (``--metrics-url``), the prefix-cache hit rate, prompts prefilled on a decode replica vs handed off,
and KV bytes and tokens handed off per request, all as deltas over the measured requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from tqdm import tqdm

from jdisagg.bench import BenchOptions, BenchRequest, Lengths, Record, latencies, sender, summarize

# Server counters read before and after the measured conversations (summed over their labels).
CACHE_COUNTERS = {
    "queried_tokens": "jdisagg_prefix_cache_queried_tokens",
    "hit_tokens": "jdisagg_prefix_cache_hit_tokens",
    "local_prefills": "jdisagg_local_prefills",
    "remote_prefills": "jdisagg_remote_prefills",
    "kv_transfer_tokens": "jdisagg_kv_transfer_tokens",
    "kv_transfer_bytes": "jdisagg_kv_transfer_bytes",
    "evictions": "jdisagg_prefix_cache_evictions",
}


@dataclass(frozen=True)
class ChatWorkload:
    conversations: int
    turns: int
    system_prompt: int  # tokens shared by every conversation's first prompt
    message: Lengths  # the user's new tokens per turn
    output: Lengths  # the answer's tokens per turn
    vocab_size: int = 256

    def __post_init__(self) -> None:
        if self.conversations < 1 or self.turns < 1 or self.system_prompt < 0:
            raise ValueError("want --conversations >= 1, --turns >= 1 and --system-prompt-len >= 0")


@dataclass
class Turn:
    conversation: int
    turn: int  # from 1
    record: Record


class Conversation:
    """One user's session: its seeded messages and lengths, and the history the answers extend."""

    def __init__(self, chat: ChatWorkload, system: list[int], seed: int) -> None:
        self._chat, self._rng = chat, random.Random(seed)
        self.history = list(system)

    def next_request(self) -> BenchRequest:
        length = self._chat.message.draw(self._rng)
        self.history += [self._rng.randrange(self._chat.vocab_size) for _ in range(length)]
        return BenchRequest(list(self.history), self._chat.output.draw(self._rng), long=False)

    def answered(self, record: Record) -> None:
        self.history += record.token_ids


def conversations(chat: ChatWorkload, seed: int) -> list[Conversation]:
    """The same seed gives the same system prompt, messages and lengths (answers come from the server)."""
    rng = random.Random(seed)
    system = [rng.randrange(chat.vocab_size) for _ in range(chat.system_prompt)]
    return [Conversation(chat, system, seed * 100_003 + i + 1) for i in range(chat.conversations)]


def run_conversations(
    send_one: Callable[[BenchRequest], Record], talks: list[Conversation], turns: int, progress: bool
) -> list[Turn]:
    """Every conversation on its own thread, its turns in order; a failed turn ends its conversation."""
    done: list[Turn] = []
    lock = threading.Lock()
    bar = tqdm(total=len(talks) * turns, desc="chat", unit="turn", disable=not progress)

    def talk(index: int, conversation: Conversation) -> None:
        for turn in range(1, turns + 1):
            record = send_one(conversation.next_request())
            with lock:
                done.append(Turn(index, turn, record))
            bar.update()
            if record.status != "OK":
                return
            conversation.answered(record)

    with ThreadPoolExecutor(len(talks)) as pool:
        for index, conversation in enumerate(talks):
            pool.submit(talk, index, conversation)
    bar.close()
    return done


def scrape_counters(metrics_url: str) -> dict[str, float]:
    """The ``CACHE_COUNTERS`` now, each summed over its labels (0 when the server does not export it)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = dict.fromkeys(CACHE_COUNTERS, 0.0)
    names = {name: key for key, name in CACHE_COUNTERS.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = names.get(sample.name.removesuffix("_total"))
            if key and not sample.name.endswith("_created"):
                totals[key] += sample.value
    return totals


def run_chat_bench(opts: BenchOptions, chat: ChatWorkload) -> dict:
    """One warm-up conversation of one turn on a system prompt of its own (so it warms the programs, not the
    cache), then the measured conversations; the summary (JSON-ready)."""
    with sender(opts) as send_one:
        warmup = ChatWorkload(1, 1, chat.system_prompt, chat.message, chat.output, chat.vocab_size)
        run_conversations(send_one, conversations(warmup, opts.seed + 7919), 1, progress=False)
        before = scrape_counters(opts.metrics_url) if opts.metrics_url else None
        start = time.perf_counter()
        turns = run_conversations(send_one, conversations(chat, opts.seed), chat.turns, opts.progress)
        duration = time.perf_counter() - start
    records = [t.record for t in turns]
    summary = summarize(records, duration, opts.slo_ttft_ms, opts.slo_tpot_ms)
    ok = [t for t in turns if t.record.status == "OK"]
    summary["turns"] = {
        "first": latencies([t.record for t in ok if t.turn == 1])["ttft_ms"],
        "later": latencies([t.record for t in ok if t.turn > 1])["ttft_ms"],
    }
    # Greedy answers are a function of the prompts: two servers that answer alike give the same digest.
    answers = sorted((t.conversation, t.turn, t.record.token_ids) for t in ok)
    summary["answers_digest"] = hashlib.sha256(json.dumps(answers).encode()).hexdigest()
    summary["prompt_tokens_per_request"] = sum(r.prompt_tokens for r in records) / max(len(records), 1)
    if before is not None:
        after = scrape_counters(opts.metrics_url)
        delta = {key: after[key] - before[key] for key in CACHE_COUNTERS}
        summary["server_counters"] = delta
        queried = delta["queried_tokens"]
        summary["hit_rate"] = delta["hit_tokens"] / queried if queried else None
        summary["kv_transfer_bytes_per_request"] = delta["kv_transfer_bytes"] / max(len(records), 1)
        summary["kv_transfer_tokens_per_request"] = delta["kv_transfer_tokens"] / max(len(records), 1)
    summary["config"] = {**{k: v for k, v in asdict(opts).items() if k != "progress"}, "chat": asdict(chat)}
    return summary


def format_chat_summary(s: dict) -> str:
    """The lines ``jdisagg bench --workload chat`` adds under the usual summary."""
    lines = []
    for key, label in (("first", "first turns"), ("later", "later turns")):
        if p := s["turns"][key]:
            lines.append(f"TTFT {label}: p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms")
    lines.append(f"prompt tokens per request: {s['prompt_tokens_per_request']:.1f}")
    if "server_counters" in s:
        c = s["server_counters"]
        rate = "n/a (the server exports no prefix-cache counters)" if s["hit_rate"] is None else \
            f"{100 * s['hit_rate']:.1f} % ({c['hit_tokens']:.0f} of {c['queried_tokens']:.0f} prompt tokens)"
        lines += [
            f"prefix cache hit rate: {rate}, {c['evictions']:.0f} pages evicted",
            f"prefilled on the decode replica: {c['local_prefills']:.0f}, "
            f"handed off: {c['remote_prefills']:.0f}",
            f"KV handed off per request: {s['kv_transfer_tokens_per_request']:.1f} tokens, "
            f"{s['kv_transfer_bytes_per_request'] / 1024:.1f} KiB",
        ]
    return "\n".join(lines)
