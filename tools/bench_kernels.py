"""Benchmark the paged-attention decode kernels against JAX's bundled Pallas kernel and the XLA reference.

Decode attention is bound by reading the KV cache, so the figure of merit is effective KV bandwidth
(K and V bytes of all live tokens / kernel time), printed next to the device's measured copy bandwidth
(`x + 1` over a large buffer: read + write bytes / time), which is the practical ceiling.

    python tools/bench_kernels.py                         # full shapes (meant for a GPU)
    python tools/bench_kernels.py --shapes small          # CPU smoke run: reference + interpret
    python tools/bench_kernels.py --sweep --json out.json # GPU: also try kernel tuning knobs
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.kernels import paged_attention, paged_attention_reference
from jdisagg.kernels.gpu import paged_attention_gpu

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
SHAPES = {
    "full": [(64, 2048), (16, 8192), (128, 1024), (8, 32768)],
    "small": [(2, 128), (1, 512)],
}


@dataclass
class Row:
    """One timed kernel on one shape."""

    kernel: str
    batch: int
    ctx: int
    ms: float
    kv_gb_s: float
    max_rel_err: float


def median_seconds(fn: Callable[[], jax.Array], warmup: int, iters: int, repeats: int = 5) -> float:
    """Seconds per call of `fn()`: the median over `repeats` of `iters` back-to-back calls with one
    `block_until_ready` at the end, after `warmup` untimed calls. Back-to-back, the launch of call i+1
    overlaps call i on an accelerator, as in a decode loop; a sync per call would add the host round trip
    (tens of microseconds) to kernels that take about a hundred."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, warmup: int, iters: int) -> float:
    """Measured device bandwidth in bytes/s of an elementwise `x + 1` (reads and writes `num_bytes`)."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1)
    return 2 * num_bytes / median_seconds(lambda: add_one(x), warmup, iters)


def make_inputs(batch: int, ctx: int, dtype, seed: int = 0):
    """Full-length sequences whose pages are scattered randomly over the pool, as after cache churn."""
    pages_per_seq = ctx // PAGE_SIZE
    total_pages = batch * pages_per_seq
    keys = jax.random.split(jax.random.key(seed), 3)
    pool = (NUM_KV_HEADS, total_pages, PAGE_SIZE, HEAD_DIM)
    q = jax.random.normal(keys[0], (batch, NUM_Q_HEADS, HEAD_DIM), dtype)
    k = jax.random.normal(keys[1], pool, dtype)
    v = jax.random.normal(keys[2], pool, dtype)
    perm = np.random.default_rng(seed).permutation(total_pages).astype(np.int32)
    page_table = jnp.asarray(perm.reshape(batch, pages_per_seq))
    lengths = jnp.full((batch,), ctx, jnp.int32)
    return q, k, v, page_table, lengths


def kernels_to_time(backend: str, sweep: bool) -> dict[str, Callable]:
    """Name -> jitted f(q, k, v, page_table, lengths); GPU-only kernels only when a GPU is present."""
    scale = HEAD_DIM**-0.5
    fns: dict[str, Callable] = {
        f"ours[{backend}]": functools.partial(paged_attention, scale=scale, backend=backend),
        "xla-reference": functools.partial(paged_attention_reference, scale=scale),
    }
    if backend == "gpu":
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled

        # The bundled kernel takes (q, k_pages, v_pages, block_tables, lengths) in our layout; its softmax
        # scale is implicit (1), so q is pre-scaled to compute the same function.
        fns["bundled"] = lambda q, k, v, pt, lengths: bundled.paged_attention(q * scale, k, v, pt, lengths)
    if sweep and backend in ("gpu", "interpret"):
        for ppb, warps, stages in itertools.product((4, 8, 16), (4, 8), (2, 3, 4)):
            fns[f"ours[ppb={ppb},w={warps},s={stages}]"] = functools.partial(
                paged_attention_gpu,
                scale=scale,
                pages_per_block=ppb,
                num_warps=warps,
                num_stages=stages,
                interpret=backend == "interpret",
            )
    return {name: jax.jit(fn) for name, fn in fns.items()}


def run(args: argparse.Namespace) -> dict:
    platform = jax.default_backend()
    backend = args.backend or ("gpu" if platform == "gpu" else "interpret")
    dtype = jnp.dtype(args.dtype)
    copy_bytes = (1 << 30) if args.shapes == "full" else (64 << 20)
    copy_bw = copy_bandwidth(copy_bytes, args.warmup, args.iters)
    kernels = kernels_to_time(backend, args.sweep)
    rows: list[Row] = []
    failed: list[dict] = []
    for batch, ctx in SHAPES[args.shapes]:
        inputs = make_inputs(batch, ctx, dtype)
        f32_inputs = [x.astype(jnp.float32) if x.dtype == dtype else x for x in inputs]
        expected = jax.jit(functools.partial(paged_attention_reference, scale=HEAD_DIM**-0.5))(*f32_inputs)
        kv_bytes = 2 * batch * ctx * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
        for name, fn in kernels.items():
            try:
                out = fn(*inputs).astype(jnp.float32)
                err = float(jnp.abs(out - expected).max() / jnp.abs(expected).max())
                seconds = median_seconds(functools.partial(fn, *inputs), args.warmup, args.iters)
            except Exception as e:  # one kernel failing to lower (e.g. on a newer JAX) must not hide the rest
                first_line = (str(e).strip().splitlines() or [""])[0][:160]
                print(f"{name} at batch {batch} ctx {ctx} failed: {type(e).__name__}: {first_line}")
                error = f"{type(e).__name__}: {e}"[:2000]
                failed.append({"kernel": name, "batch": batch, "ctx": ctx, "error": error})
                continue
            rows.append(Row(name, batch, ctx, seconds * 1e3, kv_bytes / seconds / 1e9, err))
    return {
        "date": datetime.date.today().isoformat(),
        "device": str(jax.devices()[0].device_kind),
        "platform": platform,
        "dtype": dtype.name,
        "heads": f"{NUM_Q_HEADS}q/{NUM_KV_HEADS}kv, head_dim {HEAD_DIM}, page {PAGE_SIZE}",
        "copy_gb_s": copy_bw / 1e9,
        "jax": jax.__version__,
        "rows": [asdict(r) for r in rows],
        "failed": failed,
    }


def print_table(result: dict) -> None:
    print(f"{result['date']}  {result['device']} ({result['platform']})  {result['dtype']}")
    print(f"{result['heads']}; measured copy bandwidth (x + 1, read + write): {result['copy_gb_s']:.1f} GB/s")
    header = f"{'kernel':<28} {'batch':>5} {'ctx':>6} {'ms':>9} {'KV GB/s':>8} {'% copy':>7} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    by_shape: dict[tuple[int, int], dict[str, dict]] = {}
    for r in result["rows"]:
        by_shape.setdefault((r["batch"], r["ctx"]), {})[r["kernel"]] = r
        pct = 100 * r["kv_gb_s"] / result["copy_gb_s"]
        print(
            f"{r['kernel']:<28} {r['batch']:>5} {r['ctx']:>6} {r['ms']:>9.3f} {r['kv_gb_s']:>8.1f} "
            f"{pct:>6.1f}% {r['max_rel_err']:>9.2e}"
        )
    for (batch, ctx), named in by_shape.items():
        ours = next((r for name, r in named.items() if name.startswith("ours[") and "=" not in name), None)
        if ours and "bundled" in named:
            ratio = named["bundled"]["ms"] / ours["ms"]
            print(f"batch {batch:>3} ctx {ctx:>5}: ours/bundled speed = {ratio:.2f}x")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--backend", help="backend of our kernel (default: gpu on GPU, else interpret)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="full")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20, help="back-to-back calls per timed repeat")
    parser.add_argument("--sweep", action="store_true", help="also time pages_per_block/num_warps/num_stages")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
