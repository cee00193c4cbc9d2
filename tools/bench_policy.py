"""The scheduling policies measured, each engine behind a real gRPC server on loopback, in one run.

``prefix``: the multi-turn chat workload of ``jdisagg bench --workload chat`` (``jdisagg/bench_chat.py``:
concurrent conversations after a shared system prompt, each turn's prompt the previous prompt + its answer +
a new message) against the same engine with the prefix cache on and off. Greedy answers must agree (the
digest of every answer is compared), so both runs send the same prompts. Prints the hit rate, TTFT p50/p99
of first and later turns, KV tokens and bytes handed off per request, the prompt tokens the prefill
replicas took from their own cache per request (``--prefill-cache-gb`` sets its budget), and the ratios
off/on.

``local``: conditional disaggregation. The same mixed workload (short chat prompts and a share of long
documents, Poisson arrivals) against a disaggregated engine for each ``local_prefill_tokens`` threshold: a
prompt with at most that many uncached tokens is prefilled on its decode replica, interleaved with decode
steps, instead of on the prefill mesh and handed off. Prints TTFT and TPOT percentiles and goodput per
threshold and which threshold gave the best goodput.

    python tools/bench_policy.py prefix                                # demo model, 2x1 -> 1x2, 8 x 4 turns
    python tools/bench_policy.py prefix --model DIR --prefill-mesh 4x1 --decode-mesh 2x2 --json out.json
    python tools/bench_policy.py local --thresholds 0,32,128,1024
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import sys
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(args: argparse.Namespace, run: Callable, **engine_options) -> dict:
    """Build the engine, serve it on loopback with metrics, and return ``run(bench options)``."""
    from jdisagg import Engine
    from jdisagg.bench import BenchOptions, Lengths, Workload
    from jdisagg.serving.server import GenerationServer

    with Engine(args.model, prefill_mesh=args.prefill_mesh, decode_mesh=args.decode_mesh,
                max_batch=args.max_batch, max_context=args.max_context, progress=False,
                **engine_options) as engine:
        server, metrics_port = GenerationServer("127.0.0.1", 0, 64), free_port()
        server.serve(engine, "127.0.0.1", metrics_port)
        try:
            output = Lengths.parse(args.output_len)
            result = run(BenchOptions(f"127.0.0.1:{server.port}", Workload(output, output), seed=args.seed,
                                      metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", progress=False))
            hits = engine.metrics.registry.get_sample_value("jdisagg_prefill_cache_hit_tokens_total",
                                                            {"model_name": engine.model_name})
            return {**result, "prefill_cache_hit_tokens_per_request": hits / max(result["requests"], 1)}
        finally:
            server.shutdown(None, 1.0)


def row(label: str, values: list[float | None], fmt: str = "{:12.2f}") -> str:
    return f"{label:24} " + " ".join(fmt.format(v) if v is not None else f"{'n/a':>12}" for v in values)


def prefix(args: argparse.Namespace) -> tuple[dict, bool]:
    from jdisagg.bench import Lengths
    from jdisagg.bench_chat import ChatWorkload, run_chat_bench

    chat = ChatWorkload(args.conversations, args.turns, args.system_prompt_len,
                        Lengths.parse(args.message_len), Lengths.parse(args.output_len), args.vocab_size)
    runs = {
        label: served(args, lambda opts: run_chat_bench(opts, chat), prefix_cache=cache,
                      colocate=args.colocate, local_prefill_tokens=args.local_prefill_tokens,
                      prefill_cache_gb=args.prefill_cache_gb)
        for label, cache in (("cache on", True), ("cache off", False))
    }
    on, off = runs["cache on"], runs["cache off"]
    where = f"{args.prefill_mesh} -> {args.decode_mesh}{' colocated' if args.colocate else ''}"
    print(f"\n{args.conversations} conversations x {args.turns} turns, system prompt "
          f"{args.system_prompt_len}, messages {args.message_len}, answers {args.output_len} tokens; {where}")
    print(f"{'':24} {'cache on':>12} {'cache off':>12} {'off / on':>12}")

    def line(label: str, a: float | None, b: float | None, fmt: str = "{:12.2f}") -> None:
        print(row(label, [a, b], fmt) + (f" {b / a:11.2f}x" if a and b is not None else ""))

    line("hit rate %", *(100 * r["hit_rate"] if r["hit_rate"] is not None else None for r in (on, off)),
         fmt="{:12.1f}")
    for part in ("first", "later"):
        for q in ("p50", "p99"):
            line(f"TTFT {part} turns {q} ms", *((r["turns"][part] or {}).get(q) for r in (on, off)))
    for label, key, scale in (("KV tokens / request", "kv_transfer_tokens_per_request", 1),
                              ("KV KiB / request", "kv_transfer_bytes_per_request", 1024),
                              ("prompt tokens / request", "prompt_tokens_per_request", 1),
                              ("prefill-side hits / req", "prefill_cache_hit_tokens_per_request", 1)):
        line(label, on[key] / scale, off[key] / scale, fmt="{:12.1f}")
    line("output tok/s", on["output_token_throughput"], off["output_token_throughput"])
    same = on["answers_digest"] == off["answers_digest"]
    print(f"answers identical with the cache on and off: {same}")
    return runs, same and on["succeeded"] == off["succeeded"] == on["requests"]


def local(args: argparse.Namespace) -> tuple[dict, bool]:
    from jdisagg.bench import Lengths, Workload, run_bench

    workload = Workload(Lengths.parse(args.prompt_len), Lengths.parse(args.output_len), args.long_fraction,
                        Lengths.parse(args.long_prompt_len), None, args.vocab_size)

    def run(opts):
        return run_bench(dataclasses.replace(
            opts, workload=workload, num_requests=args.num_requests, rate=args.rate,
            slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot))

    runs = {f"local <= {t}": served(args, run, local_prefill_tokens=t) for t in args.thresholds}
    print(f"\n{args.num_requests} requests at {args.rate}/s, prompts {args.prompt_len} with "
          f"{args.long_fraction:.0%} of {args.long_prompt_len}, outputs {args.output_len}; "
          f"{args.prefill_mesh} -> {args.decode_mesh}; goodput under TTFT <= {args.slo_ttft} ms "
          f"and TPOT <= {args.slo_tpot} ms")
    print(f"{'':24} " + " ".join(f"{name:>12}" for name in runs))
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        for q in ("p50", "p99"):
            print(row(f"{label} {q} ms", [(r[key] or {}).get(q) for r in runs.values()]))
    print(row("output tok/s", [r["output_token_throughput"] for r in runs.values()]))
    print(row("goodput req/s", [r["goodput"] for r in runs.values()]))
    best = max(runs, key=lambda name: runs[name]["goodput"])
    print(f"best goodput: {best}")
    return runs, all(r["succeeded"] == r["requests"] for r in runs.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp, pl = sub.add_parser("prefix"), sub.add_parser("local")
    for s in (pp, pl):
        s.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
        s.add_argument("--prefill-mesh", default="2x1")
        s.add_argument("--decode-mesh", default="1x2")
        s.add_argument("--max-batch", type=int, default=8)
        s.add_argument("--max-context", type=int, default=1024)
        s.add_argument("--vocab-size", type=int, default=256)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--json", metavar="PATH", help="also write every summary as JSON")
    pp.add_argument("--colocate", action="store_true")
    pp.add_argument("--local-prefill-tokens", type=int, default=None,
                    help="the engine's threshold (default: its own: 0, or every prompt colocated on GPU/TPU)")
    pp.add_argument("--prefill-cache-gb", type=float, default=None,
                    help="the prefill replicas' own cache with the cache on (default: the engine's; 0: off)")
    pp.add_argument("--conversations", type=int, default=8)
    pp.add_argument("--turns", type=int, default=4)
    pp.add_argument("--system-prompt-len", type=int, default=512)
    pp.add_argument("--message-len", default="32")
    pp.add_argument("--output-len", default="16")
    pl.add_argument("--thresholds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 32, 128, 1024])
    pl.add_argument("--num-requests", type=int, default=48)
    pl.add_argument("--rate", type=float, default=4.0)
    pl.add_argument("--prompt-len", default="16:64")
    pl.add_argument("--long-fraction", type=float, default=0.2)
    pl.add_argument("--long-prompt-len", default="512")
    pl.add_argument("--output-len", default="32")
    pl.add_argument("--slo-ttft", type=float, default=2000.0)
    pl.add_argument("--slo-tpot", type=float, default=100.0)
    args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

    runs, ok = {"prefix": prefix, "local": local}[args.command](args)
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
    print(f"{meta['date']}  {meta['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **runs}, f, indent=2, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
