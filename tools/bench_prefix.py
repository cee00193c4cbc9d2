"""The prefix cache measured: the same multi-turn chat workload against the same engine with the cache on
and off, in one run, each behind a real gRPC server on loopback.

The workload is ``jdisagg bench --workload chat`` (``jdisagg/bench_chat.py``): concurrent conversations that
share a system prompt, each turn's prompt the previous prompt + its answer + a new message. Greedy answers
must be the same with the cache on and off (the digest of every answer is compared), so both runs send the
same prompts. Printed: hit rate, TTFT p50/p99 of first and later turns, KV tokens and bytes handed off per
request, and the ratios off/on.

    python tools/bench_prefix.py                                   # demo model, 2x1 -> 1x2, 8 x 4 turns
    python tools/bench_prefix.py --local-prefill-tokens 64         # + conditional disaggregation
    python tools/bench_prefix.py --model DIR --prefill-mesh 4x1 --decode-mesh 2x2 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args: argparse.Namespace, prefix_cache: bool) -> dict:
    from jdisagg import Engine
    from jdisagg.bench import BenchOptions, Lengths, Workload
    from jdisagg.bench_chat import ChatWorkload, run_chat_bench
    from jdisagg.serving.server import GenerationServer

    output = Lengths.parse(args.output_len)
    chat = ChatWorkload(args.conversations, args.turns, args.system_prompt_len,
                        Lengths.parse(args.message_len), output, args.vocab_size)
    local = args.local_prefill_tokens
    with Engine(args.model, prefill_mesh=args.prefill_mesh, decode_mesh=args.decode_mesh,
                colocate=args.colocate, max_batch=args.conversations, max_context=args.max_context,
                prefix_cache=prefix_cache, local_prefill_tokens=local, progress=False) as engine:
        server, metrics_port = GenerationServer("127.0.0.1", 0, 64), free_port()
        server.serve(engine, "127.0.0.1", metrics_port)
        try:
            opts = BenchOptions(f"127.0.0.1:{server.port}", Workload(output, output), seed=args.seed,
                                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", progress=False)
            return run_chat_bench(opts, chat)
        finally:
            server.shutdown(None, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--prefill-mesh", default="2x1")
    p.add_argument("--decode-mesh", default="1x2")
    p.add_argument("--colocate", action="store_true")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--local-prefill-tokens", type=int, default=None,
                   help="the engine's threshold (default: its own; colocated prefills every prompt locally)")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=512)
    p.add_argument("--message-len", default="32")
    p.add_argument("--output-len", default="16")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write both summaries as JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

    runs = {"cache on": run_one(args, True), "cache off": run_one(args, False)}
    on, off = runs["cache on"], runs["cache off"]
    print(f"\n{args.conversations} conversations x {args.turns} turns, "
          f"system prompt {args.system_prompt_len}, messages {args.message_len}, answers {args.output_len} "
          f"tokens; {args.prefill_mesh} -> {args.decode_mesh}{' colocated' if args.colocate else ''}")
    print(f"{'':22} {'cache on':>12} {'cache off':>12} {'off / on':>9}")

    def row(label: str, a: float | None, b: float | None, fmt: str = "{:12.2f}") -> None:
        ratio = f"{b / a:8.2f}x" if a and b is not None else ""
        cells = [fmt.format(x) if x is not None else f"{'n/a':>12}" for x in (a, b)]
        print(f"{label:22} {cells[0]} {cells[1]} {ratio}")

    rate = [r["hit_rate"] for r in (on, off)]
    row("hit rate %", *(100 * x if x is not None else None for x in rate), fmt="{:12.1f}")
    for part in ("first", "later"):
        for q in ("p50", "p99"):
            values = [(r["turns"][part] or {}).get(q) for r in (on, off)]
            row(f"TTFT {part} turns {q} ms", *values)
    for label, key, scale in (("KV tokens / request", "kv_transfer_tokens_per_request", 1),
                              ("KV KiB / request", "kv_transfer_bytes_per_request", 1024),
                              ("prompt tokens / req", "prompt_tokens_per_request", 1)):
        row(label, on[key] / scale, off[key] / scale, fmt="{:12.1f}")
    row("output tok/s", on["output_token_throughput"], off["output_token_throughput"])
    same = on["answers_digest"] == off["answers_digest"]
    print(f"answers identical with the cache on and off: {same}")
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
    print(f"{meta['date']}  {meta['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **runs}, f, indent=2, default=str)
    return 0 if same and on["succeeded"] == off["succeeded"] == on["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
