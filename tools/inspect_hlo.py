"""What XLA makes of one decode step at a named model size, with no weights allocated.

A decode step at small batch should read every weight once: its floor is the params' bytes over the
memory bandwidth. This lowers the engine's decode program (``jdisagg.programs.decode_fn``, as
``compile_decode`` builds it) and the plain loop's forward (``tools/bench_engine.py``) over abstract
shapes, with the projections fused as the engine serves them and separate as the checkpoint stores them,
and prints what would make a step read more or launch more:

- before optimisation (our model code; the same on every backend): the matmuls reading weights per layer,
  the weights read as ``[out, in]`` (contracted on their last axis, ``x @ W.T``: a GEMM library takes it
  as it is, a kernel that wants ``[in, out]`` needs a transpose; the tied LM head is one), and every convert,
  transpose, copy or gather as large as a weight matrix;
- after the backend's optimisation (this machine's backend: CPU here, the GPU's pipeline on a GPU): the
  launches of the entry computation (fusions, library calls, loose ops) per layer, the weight-sized
  converts/copies/transposes written to memory (entry ops and fusion outputs: inside a fusion they stay in
  registers), matmuls XLA rewrote as a weight-sized multiply + reduce inside a fusion (a GEMV run by a
  reduction kernel rather than a GEMM), copies of a whole layer's KV cache (its update should happen in
  place), and XLA's estimate of the bytes the step accesses against the params' bytes;
- ``--time`` (on an accelerator): the median step time with zero weights against params / copy bandwidth.

    python tools/inspect_hlo.py --config llama3-8b --dtype bfloat16            # CPU or GPU: the HLO
    python tools/inspect_hlo.py --config llama3-8b --dtype bfloat16 --time     # GPU: and the time
    python tools/inspect_hlo.py --config llama-124m --time --repeats 3         # CPU smoke run

On CPU the backend turns every bfloat16 matmul into a float32 one (it has no bf16 GEMM), so there the
optimised module converts each weight to float32 every step, and it updates a bfloat16 KV cache through a
float32 copy of it; the pre-optimisation section says whether our code asks for any such thing (it does
not), and the GPU run says what the GPU pipeline does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import CONFIGS, dense_decode_forward, model_config  # noqa: E402

from jdisagg.models.llama import UNFUSED, Fused, Llama  # noqa: E402
from jdisagg.programs import decode_fn  # noqa: E402

PAGE_SIZE = 16
FUSED = Fused(qkv=True, gate_up=True)
# Ops that only name or forward a value: no launch, no memory traffic of their own.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "replica-id", "opt-barrier"}
# Ops that write a tensor of their own size: a weight-sized one is a weight read and written again.
_MATERIALIZING = {"convert", "transpose", "copy", "gather", "concatenate", "broadcast", "pad", "slice",
                  "dynamic-slice", "reverse"}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\]\S*\s+"
    r"(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<attrs>.*)$"
)


@dataclass
class Instruction:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: str
    operands: list[str]
    attrs: str
    line: str
    computation: str
    root: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def parse_hlo(text: str) -> list[Instruction]:
    """The array-valued instructions of an HLO module's text, each tagged with its computation."""
    out, computation = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "=" not in stripped.split("(")[0]:
            computation = "ENTRY" if stripped.startswith("ENTRY") else stripped.split()[0].lstrip("%")
            continue
        match = _INSTRUCTION.match(line)
        if match:
            dims = tuple(int(d) for d in match["dims"].split(",") if d)
            operands = [o.strip().lstrip("%").split(" ")[-1]
                        for o in match["operands"].split(",") if o.strip()]
            out.append(Instruction(match["name"], match["dtype"], dims, match["op"], operands, match["attrs"],
                                   stripped, computation, stripped.startswith("ROOT")))
    return out


@dataclass
class Report:
    program: str
    layout: str
    weight_matmuls_per_layer: float
    weights_read_out_in: int
    materialized_before: dict[str, int]
    launches: int
    launches_per_layer: float
    launch_kinds: dict[str, int]
    materialized_after: dict[str, int]
    kv_copies_after: dict[str, int]
    matmuls_as_reductions: int
    bytes_accessed_gb: float | None
    param_gb: float
    excerpts: list[str]
    step_ms: float | None = None
    floor_ms: float | None = None


def analyse(name: str, layout: str, lowered: jax.stages.Lowered, *, num_layers: int, weight_size: int,
            param_bytes: int, kv_shapes: set[tuple[int, ...]]) -> tuple[Report, jax.stages.Compiled]:
    """Count what a lowered program does with its weights, before and after the backend optimises it."""
    before = parse_hlo(lowered.as_text(dialect="hlo"))
    sizes = {i.name: i.size for i in before}
    weight_dots, read_out_in = 0, 0
    for i in before:
        if i.op != "dot":
            continue
        for side, operand in zip(("lhs", "rhs"), i.operands, strict=False):
            if sizes.get(operand, 0) >= weight_size:
                weight_dots += 1
                contracting = re.search(rf"{side}_contracting_dims=\{{([\d,]*)\}}", i.attrs)
                rank = len(next(x.shape for x in before if x.name == operand))
                if contracting and contracting[1] == str(rank - 1) and rank == 2:
                    read_out_in += 1
    compiled = lowered.compile()
    after = parse_hlo(compiled.as_text())
    entry = [i for i in after if i.computation == "ENTRY" and i.op not in _FREE]
    kinds = Counter(_launch_kind(i) for i in entry)
    fused = _fused_computations(after)
    excerpts = [i.line[:220] for i in after if _materializes_weight(i, weight_size, kv_shapes, fused)][:6]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    accessed = cost.get("bytes accessed") if cost else None
    report = Report(
        program=name, layout=layout,
        weight_matmuls_per_layer=weight_dots / num_layers,
        weights_read_out_in=read_out_in,
        materialized_before=_materialized(before, weight_size, kv_shapes),
        launches=len(entry), launches_per_layer=len(entry) / num_layers, launch_kinds=dict(kinds),
        materialized_after=_materialized(after, weight_size, kv_shapes),
        kv_copies_after=dict(Counter(f"{i.op} {i.dtype}" for i in after if i.op in ("copy", "convert")
                                     and i.shape in kv_shapes and (i.root or i.computation not in fused))),
        matmuls_as_reductions=sum(1 for i in after if i.op == "multiply" and i.computation in fused
                                  and i.size >= weight_size and i.shape not in kv_shapes),
        bytes_accessed_gb=None if accessed is None else accessed / 1e9, param_gb=param_bytes / 1e9,
        excerpts=excerpts,
    )
    return report, compiled


def _launch_kind(i: Instruction) -> str:
    if i.op == "fusion":
        kind = re.search(r"kind=(\w+)", i.attrs)
        return f"fusion {kind[1] if kind else ''}".strip()
    if i.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
        return f"custom-call {target[1] if target else ''}".strip()
    return i.op


def _fused_computations(instructions: list[Instruction]) -> set[str]:
    """Computations a fusion calls: inside them only the root is written to memory, the rest is registers
    (a broadcast or convert feeding a reduction inside one kernel costs no traffic of its own)."""
    calls = (re.search(r"calls=%?([\w.\-]+)", i.attrs) for i in instructions if i.op == "fusion")
    return {m[1] for m in calls if m}


def _materializes_weight(i: Instruction, weight_size: int, kv_shapes: set[tuple[int, ...]],
                         fused: set[str]) -> bool:
    written = i.root or i.computation not in fused
    return written and i.op in _MATERIALIZING and i.size >= weight_size and i.shape not in kv_shapes


def _materialized(instructions: list[Instruction], weight_size: int, kv_shapes: set[tuple[int, ...]]) -> dict:
    """Weight-sized tensors written to memory by converts, transposes, copies, gathers..., counted by op."""
    fused = _fused_computations(instructions)
    return dict(Counter(f"{i.op} {i.dtype}" for i in instructions
                        if _materializes_weight(i, weight_size, kv_shapes, fused)))


def programs(config, fused: Fused, batch: int, context: int, mesh: Mesh) -> dict[str, tuple]:
    """(jitted program, abstract args) for the engine's decode step and the plain loop's forward."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), fused=fused)))
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = functools.partial(jax.ShapeDtypeStruct, sharding=replicated)
    params = jax.tree.map(lambda x: spec(x.shape, x.dtype), state)
    kvh, hd, dtype = config.num_kv_heads, config.head_dim, jnp.dtype(config.dtype)
    width = -(-context // PAGE_SIZE)
    pool = spec((kvh, batch * width + 1, PAGE_SIZE, hd), dtype)
    decode = jax.jit(functools.partial(decode_fn, graphdef, mesh, PAGE_SIZE, kvh, hd**-0.5, None),
                     out_shardings=(replicated, [(replicated, replicated)] * config.num_layers),
                     donate_argnums=(1,))
    cache = spec((batch, context, kvh, hd), dtype)
    loop = jax.jit(dense_decode_forward(graphdef, batch, context), donate_argnums=(1,))
    rows = spec((batch,), jnp.int32)
    return {
        f"engine decode[{batch}, {width} pages]": (
            decode, (params, [(pool, pool)] * config.num_layers, rows, rows, spec((batch, width), jnp.int32))
        ),
        f"plain loop forward[{batch}, {context}]": (
            loop, (params, [(cache, cache)] * config.num_layers, rows, spec((), jnp.int32))),
    }


def time_step(compiled: jax.stages.Compiled, args: tuple, repeats: int) -> float:
    """Median seconds of one call with zero weights and caches, feeding the donated caches back."""
    concrete = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), args)
    params, caches, *rest = concrete
    times = []
    for _ in range(repeats + 2):  # two warm-up calls
        start = time.perf_counter()
        logits, caches = compiled(params, caches, *rest)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of ``x + 1`` over ``nbytes`` (read + write), as tools/bench_kernels.py measures."""
    x = jnp.zeros(nbytes // 4, jnp.float32)
    add = jax.jit(lambda x: x + 1)
    jax.block_until_ready(add(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(add(x))
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def print_report(r: Report) -> None:
    print(f"\n{r.program}, {r.layout} projections")
    print(f"  before optimisation: {r.weight_matmuls_per_layer:.2f} weight matmuls per layer, "
          f"{r.weights_read_out_in} read as [out, in], weight-sized writes: "
          f"{r.materialized_before or 'none'}")
    accessed = "n/a" if r.bytes_accessed_gb is None else (
        f"{r.bytes_accessed_gb:.2f} GB = {r.bytes_accessed_gb / r.param_gb:.2f}x "
        f"the params' {r.param_gb:.2f} GB")
    print(f"  after optimisation: {r.launches} launches = {r.launches_per_layer:.1f} per layer; "
          f"bytes accessed (XLA's estimate) {accessed}")
    print(f"    launches by kind: {dict(sorted(r.launch_kinds.items(), key=lambda kv: -kv[1]))}; "
          f"matmuls rewritten as a weight-sized multiply + reduce in one fusion: {r.matmuls_as_reductions}")
    print(f"    weight-sized writes: {r.materialized_after or 'none'}; whole KV cache copies or converts "
          f"(the update should be in place): {r.kv_copies_after or 'none'}")
    for line in r.excerpts:
        print(f"      {line}")
    if r.step_ms is not None:
        print(f"  step {r.step_ms:.3f} ms; floor (params / copy bandwidth) {r.floor_ms:.3f} ms = "
              f"{r.step_ms / r.floor_ms:.2f}x the floor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256, help="tokens of KV per row")
    parser.add_argument("--layout", choices=("both", "fused", "separate"), default="both")
    parser.add_argument("--time", action="store_true", help="also run each step with zero weights")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    args = parser.parse_args(argv)

    config = model_config(args.config, args.dtype)
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    device = jax.devices()[0]
    print(f"{args.config} {args.dtype}, batch {args.batch}, context {args.context}, "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}")
    layouts = {"fused": FUSED, "separate": UNFUSED}
    if args.layout != "both":
        layouts = {args.layout: layouts[args.layout]}
    bandwidth = copy_bandwidth() if args.time else None
    reports = []
    for layout, fused in layouts.items():
        for name, (fn, fn_args) in programs(config, fused, args.batch, args.context, mesh).items():
            leaves = jax.tree.leaves(fn_args[0])
            param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
            weight_size = min(x.size for x in leaves if len(x.shape) >= 2)
            kv_shapes = {tuple(x.shape) for x in jax.tree.leaves(fn_args[1])}
            report, compiled = analyse(name, layout, fn.lower(*fn_args), num_layers=config.num_layers,
                                       weight_size=weight_size, param_bytes=param_bytes, kv_shapes=kv_shapes)
            if args.time:
                report.step_ms = 1e3 * time_step(compiled, fn_args, args.repeats)
                report.floor_ms = 1e3 * param_bytes / bandwidth
            print_report(report)
            reports.append(dataclasses.asdict(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "dtype": args.dtype, "batch": args.batch,
                       "context": args.context, "platform": device.platform, "device": device.device_kind,
                       "jax": jax.__version__,
                       "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
                       "reports": reports}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
