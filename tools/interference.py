"""The interference experiment: does a long prefill stall decode less when the phases get their own cores?

    python tools/interference.py --out docs/interference

Same hardware budget (the CPU cores given by ``--cores``, default all of them), same seeded workload, two
set-ups of the built-in demo model:

- colocated: one ``jdisagg launch --colocate`` process on every core of the budget; prefill and decode
  share one device, and prompts are prefilled on the decode replica in chunks interleaved with decode
  steps under a per-step token budget (chunked prefill, Sarathi-Serve's aggregated baseline).
  ``colocated@N`` sets that budget to N tokens (``--setups colocated@64,colocated@128,...`` sweeps it).
- colocated-unchunked: the same with ``--local-prefill-tokens 0``: each prompt is one prefill program
  on the prefill thread (``--colocate``'s default on the CPU, where it runs beside the decode steps).
- disaggregated: ``jdisagg launch --processes`` with the prefill worker pinned to the first half of the
  cores and the decode worker to the second half (the front, which only schedules, may run anywhere in
  the budget).

For each share of long prompts and each request rate, ``jdisagg bench`` measures the mixed workload (short
chat turns plus long documents); the script writes every summary to ``interference.json`` and plots p99
TPOT and goodput against the rate, both set-ups, to ``interference.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from jdisagg.bench import BenchOptions, Lengths, Workload, format_summary, run_bench
from jdisagg.serving.client import wait_until_serving

EVERY_PROMPT = 1 << 20  # a --local-prefill-tokens above any context: every prompt prefills locally


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_list(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def start_server(setup: str, cores: list[int], port: int, metrics_port: int, max_batch: int,
                 log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "jdisagg.cli", "launch", "--port", str(port), "--metrics-port",
               str(metrics_port), "--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--max-batch",
               str(max_batch), "--http-port", "0", "--no-progress"]
    if setup.partition("@")[0] == "colocated":  # colocated@N: chunked prefill under a step budget of N tokens
        # Every prompt chunked, whatever the platform's colocated default (whole prompts on the CPU).
        command += ["--colocate", "--local-prefill-tokens", str(EVERY_PROMPT)]
        if "@" in setup:
            command += ["--step-token-budget", setup.partition("@")[2]]
    elif setup == "colocated-unchunked":
        command += ["--colocate", "--local-prefill-tokens", "0"]
    else:
        half = max(1, len(cores) // 2)
        command += ["--processes", "--prefill-cpus", cpu_list(cores[:half]),
                    "--decode-cpus", cpu_list(cores[half:] or cores)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/interference"), help="output directory")
    parser.add_argument("--cores", default=None, help="CPU cores of the budget, e.g. 0-1 (default: all)")
    parser.add_argument("--rates", default="1,2,4",
                        help="request rates to sweep, req/s (default: %(default)s)")
    parser.add_argument("--long-fractions", default="0.1,0.25",
                        help="shares of long prompts to sweep (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=40, help="measured requests per point")
    parser.add_argument("--prompt-len", default="16:48", help="short prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", default="64", help="output tokens (default: %(default)s)")
    parser.add_argument("--long-prompt-len", default="768:960",
                        help="long prompt tokens (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="decode batch (default: %(default)s)")
    parser.add_argument("--slo-ttft", type=float, default=3000.0, help="TTFT SLO, ms (default: %(default)s)")
    parser.add_argument("--slo-tpot", type=float, default=60.0, help="TPOT SLO, ms (default: %(default)s)")
    parser.add_argument("--setups", default="colocated,colocated-unchunked,disaggregated")
    args = parser.parse_args(argv)

    from jdisagg.workers.worker import parse_cpus

    cores = sorted(parse_cpus(args.cores) if args.cores else os.sched_getaffinity(0))
    rates = [float(r) for r in args.rates.split(",")]
    fractions = [float(f) for f in args.long_fractions.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for setup in args.setups.split(","):
        port, metrics_port = free_port(), free_port()
        server = start_server(setup, cores, port, metrics_port, args.max_batch, args.out / f"{setup}.log")
        try:
            wait_until_serving(f"127.0.0.1:{port}", 600)
            for fraction in fractions:
                for rate in rates:
                    workload = Workload(
                        Lengths.parse(args.prompt_len), Lengths.parse(args.output_len), fraction,
                        Lengths.parse(args.long_prompt_len), Lengths.parse("16"),
                    )
                    summary = run_bench(BenchOptions(
                        f"127.0.0.1:{port}", workload, args.num_requests, rate, warmup=4, seed=0,
                        slo_ttft_ms=args.slo_ttft, slo_tpot_ms=args.slo_tpot,
                        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", progress=False,
                    ))
                    summary.update(setup=setup, rate=rate, long_fraction=fraction)
                    results.append(summary)
                    print(f"\n== {setup}, long share {fraction}, {rate} req/s\n{format_summary(summary)}",
                          flush=True)
        finally:
            server.terminate()
            server.wait(60)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, budget cores {cpu_list(cores)}",
        "command": "python tools/interference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results,
    }
    (args.out / "interference.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    plot(results, args.out / "interference.png", args.slo_tpot)
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    rows = ["| long share | rate (req/s) | set-up | TPOT mean / p90 / p99 (ms) | short prompts' TPOT p99 "
            "(ms) | TTFT mean / p99 (ms) | goodput (req/s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r["long_fraction"], r["rate"], r["setup"])):
        tpot, ttft = r["tpot_ms"] or {}, r["ttft_ms"] or {}
        short = ((r.get("by_prompt") or {}).get("short") or {}).get("tpot_ms") or {}
        rows.append(f"| {r['long_fraction']} | {r['rate']:g} | {r['setup']} | {tpot.get('mean', 0):.1f} / "
                    f"{tpot.get('p90', 0):.1f} / {tpot.get('p99', 0):.1f} | {short.get('p99', 0):.1f} | "
                    f"{ttft.get('mean', 0):.0f} / {ttft.get('p99', 0):.0f} | {r['goodput']:.2f} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, slo_tpot: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["setup"], r["long_fraction"]) for r in results})
    for setup, fraction in keys:
        points = sorted((r for r in results if r["setup"] == setup and r["long_fraction"] == fraction),
                        key=lambda r: r["rate"])
        style = {"disaggregated": "-o", "colocated": "--s"}.get(setup, ":^")
        label = f"{setup}, {fraction:.0%} long"
        p99 = [(r["tpot_ms"] or {}).get("p99", float("nan")) for r in points]
        left.plot([r["rate"] for r in points], p99, style, label=label)
        right.plot([r["rate"] for r in points], [r["goodput"] for r in points], style, label=label)
    left.axhline(slo_tpot, color="grey", linewidth=0.8, linestyle=":")
    left.set(xlabel="request rate (req/s)", ylabel="p99 TPOT (ms)", yscale="log", title="decode stalls")
    right.set(xlabel="request rate (req/s)", ylabel=f"goodput (req/s, TPOT <= {slo_tpot:.0f} ms)",
              title="goodput")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
