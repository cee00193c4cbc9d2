"""Engine benchmarks: every system in one run on the same weights, so the ratios compare like with like.

``peers``: HF transformers ``generate()`` (when installed), the jdisagg ``Engine`` colocated and
disaggregated, and a plain jitted JAX loop over a dense KV cache (the same model code with no serving around
it: the floor of our own stack). Prints output tok/s, TTFT and TPOT per system, and each one's ratio to HF
and to the plain loop; greedy runs also check that every system produced the same tokens.

``context``: decode cost against ``max_context`` for one fixed workload (the demo model, 64 requests of 32
prompt + 128 output tokens at once, its position limit raised to the largest context): throughput should
follow the live context, not the configured one.

    python tools/bench_engine.py peers --config llama-124m --batch 1,16            # CPU, all four systems
    python tools/bench_engine.py peers --config llama-124m --batch 16 --temperature 0.8 --top-p 0.9
    python tools/bench_engine.py peers --config llama3-8b --dtype bfloat16 --batch 1,16 --no-hf   # one GPU
    python tools/bench_engine.py context --contexts 256,1024,4096,16384
    python tools/bench_engine.py sampling --vocab 128256 --batch 16      # the sampler's share of a step
    python tools/bench_engine.py overhead --batch 8                      # engine TPOT vs the device step
    python tools/bench_engine.py prefill --batch 16 --prompt-len 128     # HF vs run_batch vs one at a time

``--random-weights`` (the default for ``peers``) builds the model straight onto the device with no
checkpoint on disk; HF then gets the same weights through a temporary safetensors directory (CPU sizes only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

CONFIGS = {
    # The issue's 124M-parameter Llama: hidden 768, 12 layers, 12 q / 4 kv heads, vocab 32,000.
    "llama-124m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                       num_kv_heads=4, head_dim=64, rope_theta=10000.0, max_position_embeddings=2048,
                       tie_word_embeddings=False),
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                      num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}


@dataclass
class Result:
    system: str
    batch: int
    output_tok_s: float
    ttft_ms: float  # mean over the batch
    prefill_ms: float  # until every request of the batch had its first token
    tpot_ms: float
    tokens: list[list[int]] = dataclasses.field(repr=False)


def model_config(name: str, dtype: str):
    from jdisagg.models import ModelConfig

    return ModelConfig(**CONFIGS[name], rms_norm_eps=1e-5, rope_scaling=None, attention_bias=False,
                       eos_token_ids=(), dtype=dtype)


def random_model(config, seed: int):
    """Seeded random params generated on the default device (no host copy, no checkpoint): kernels
    N(0, 1/fan_in), embeddings N(0, 1), norms 1 — logits stay O(1) at any width."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdisagg.models.llama import Llama

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    values = []
    for i, (path, var) in enumerate(flat):
        leaf, shape, dtype = str(path[-1]), var.shape, var.dtype
        if leaf == "scale":
            values.append(jnp.ones(shape, dtype))
            continue
        std = 1.0 if leaf == "embedding" else shape[0] ** -0.5
        make = jax.jit(lambda key, std=std, shape=shape, dtype=dtype: (
            std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
        values.append(make(jax.random.key(seed * 1000 + i)))
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat, values,
                                                                                            strict=True)]))


def word_tokenizer(vocab_size: int):
    """A tokenizer for random-weight models: token i is the word ``t{i}`` (the engine only detokenizes)."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from jdisagg.tokenizer import HFTokenizer

    tok = tokenizers.Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return HFTokenizer(tok)


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(1, vocab, (batch, length)).tolist()


def run_engine(module, tokenizer, batch_prompts, args, *, colocate: bool, label: str) -> Result:
    from jdisagg import Engine, SamplingParams

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature,
                            top_p=args.top_p, seed=0 if args.temperature else None)
    context = -(-(args.prompt_len + args.output_len + 1) // 16) * 16
    built = time.perf_counter()
    with Engine(module, tokenizer=tokenizer, prefill_mesh="1x1", decode_mesh="1x1", colocate=colocate,
                max_batch=len(batch_prompts), max_context=context, progress=False,
                attention_backend=args.attention_backend) as engine:
        print(f"  {label}: engine built and compiled in {time.perf_counter() - built:.1f} s", flush=True)
        engine.generate(batch_prompts[:1], dataclasses.replace(params, max_tokens=2))  # warm the path
        start = time.perf_counter()
        outputs = engine.generate(batch_prompts, params)
        wall = time.perf_counter() - start
    ttfts = [o.metrics.ttft for o in outputs]
    tpots = [o.metrics.tpot for o in outputs if o.metrics.tpot is not None]
    return Result(label, len(batch_prompts), len(batch_prompts) * args.output_len / wall,
                  1e3 * statistics.mean(ttfts), 1e3 * max(ttfts), 1e3 * statistics.mean(tpots),
                  [o.token_ids for o in outputs])


def dense_decode_forward(graphdef, batch: int, total: int):
    """The plain loop's forward: one token per row at one shared ``position`` over a dense KV cache
    ``[batch, total, kv_heads, head_dim]`` per layer -> float32 logits and the updated caches.
    (``tools/inspect_hlo.py`` lowers this too.)"""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def forward(state, caches, tokens, position):
        model = nnx.merge(graphdef, state)
        rows, positions = jnp.arange(batch), jnp.full(batch, position, jnp.int32)

        def attend(q, k, v, cache, window=None):
            kc, vc = cache
            kc, vc = kc.at[rows, positions].set(k), vc.at[rows, positions].set(v)
            groups = q.shape[1] // kc.shape[2]
            grouped = q.reshape(batch, kc.shape[2], groups, q.shape[-1])
            scores = jnp.einsum("bkgd,bskd->bkgs", grouped, kc, preferred_element_type=jnp.float32)
            visible = jnp.arange(total) <= position
            scores = jnp.where(visible, scores * q.shape[-1] ** -0.5, -jnp.inf)
            out = jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(scores, -1).astype(vc.dtype), vc)
            return out.reshape(q.shape), (kc, vc)

        return model.decode(tokens, positions, caches, attend)

    return forward


def run_plain_loop(module, batch_prompts, args) -> Result:
    """Dense-cache decode with the same model code: one jitted prefill over the batch, one jitted step per
    token whose output feeds the next step on device; the host reads the tokens once at the end. Its
    projections are fused as the engine serves them (``--separate-projections``: as the checkpoint)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdisagg.models.fused import fuse_projections
    from jdisagg.programs import compile_program
    from jdisagg.sampling import sample_tokens

    graphdef, state = nnx.split(module if args.separate_projections else fuse_projections(module))
    batch, length, steps = len(batch_prompts), args.prompt_len, args.output_len
    total = length + steps
    sampling = (jnp.full(batch, args.temperature, jnp.float32), jnp.zeros(batch, jnp.int32),
                jnp.full(batch, args.top_p, jnp.float32), jnp.zeros(batch, jnp.uint32))
    no_force, no_top = jnp.full(batch, -1, jnp.int32), jnp.zeros(batch, jnp.int32)

    @jax.jit
    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        hidden, kvs = model.prefill(tokens, positions)
        logits = model.logits(hidden[:, -1])
        pad = ((0, 0), (0, steps), (0, 0), (0, 0))
        caches = [(jnp.pad(k, pad), jnp.pad(v, pad)) for k, v in kvs]
        first = sample_tokens(logits, *sampling, jnp.full(batch, length, jnp.int32), no_force, no_top).tokens
        return first, caches

    forward = dense_decode_forward(graphdef, batch, total)

    def step(state, caches, tokens, position):
        logits, caches = forward(state, caches, tokens, position)
        nxt = sample_tokens(logits, *sampling, jnp.full(batch, position + 1, jnp.int32), no_force, no_top)
        return nxt.tokens, caches

    tokens = jnp.asarray(batch_prompts, jnp.int32)
    first, caches = prefill(state, tokens)
    # Compiled as the engine compiles its decode programs (same options, caches donated like its pools).
    step = compile_program(jax.jit(step, donate_argnums=(1,)).lower(state, caches, first, jnp.int32(length)),
                           platform=jax.devices()[0].platform, rows=batch)
    start = time.perf_counter()
    first, caches = prefill(state, tokens)
    first.block_until_ready()
    ttft = time.perf_counter() - start
    out = [first]
    for i in range(steps - 1):
        nxt, caches = step(state, caches, out[-1], jnp.int32(length + i))
        out.append(nxt)
    generated = np.asarray(jnp.stack(out, axis=1))
    wall = time.perf_counter() - start
    return Result("plain JAX loop", batch, batch * steps / wall, 1e3 * ttft, 1e3 * ttft,
                  1e3 * (wall - ttft) / max(steps - 1, 1), generated.tolist())


def run_hf(directory: str, batch_prompts, args) -> Result:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(batch_prompts)
    sample = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0) if \
        args.temperature else dict(do_sample=False)

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, pad_token_id=0, eos_token_id=None, **sample)

    generate(2)  # warm-up
    start = time.perf_counter()
    generate(1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(args.output_len)
    wall = time.perf_counter() - start
    return Result("HF transformers", len(batch_prompts), len(batch_prompts) * args.output_len / wall,
                  1e3 * ttft, 1e3 * ttft, 1e3 * (wall - ttft) / max(args.output_len - 1, 1),
                  out[:, ids.shape[1]:].tolist())


def peers(args) -> list[dict]:
    import jax

    if args.compile_cache:
        from jdisagg.compile_cache import enable_compile_cache

        enable_compile_cache(args.compile_cache)

    config = model_config(args.config, args.dtype)
    module = random_model(config, seed=0)
    tokenizer = word_tokenizer(config.vocab_size)
    hf_dir = None
    if not args.no_hf:
        from jdisagg.models import save_hf_safetensors

        hf_dir = tempfile.mkdtemp(prefix="bench-hf-")
        save_hf_safetensors(module, hf_dir)
    rows = []
    for batch in args.batch:
        batch_prompts = prompts(batch, args.prompt_len, config.vocab_size)
        results: list[Result] = []

        def done(result: Result, results: list[Result] = results) -> None:
            """Printed as each finishes, so a run cut short by a time limit still says something."""
            results.append(result)
            print(f"  batch {result.batch} {result.system}: {result.output_tok_s:.1f} out tok/s, "
                  f"TPOT {result.tpot_ms:.2f} ms", flush=True)

        if hf_dir:
            done(run_hf(hf_dir, batch_prompts, args))
        done(run_plain_loop(module, batch_prompts, args))
        done(run_engine(module, tokenizer, batch_prompts, args, colocate=True, label="jdisagg colocated"))
        if jax.device_count() >= 2:
            done(run_engine(module, tokenizer, batch_prompts, args, colocate=False,
                            label="jdisagg disaggregated"))
        rows += report(results, greedy=not args.temperature)
    return rows


def report(results: list[Result], *, greedy: bool) -> list[dict]:
    by_name = {r.system: r for r in results}
    hf, floor = by_name.get("HF transformers"), by_name["plain JAX loop"]
    print(f"\nbatch {results[0].batch}: {'greedy' if greedy else 'sampled'}")
    print(f"{'system':24} {'out tok/s':>10} {'TTFT ms':>9} {'prefill ms':>10} {'TPOT ms':>9} {'vs HF':>7} "
          f"{'vs loop':>8} {'prefill vs HF':>13}")
    rows = []
    for r in results:
        vs_hf = r.output_tok_s / hf.output_tok_s if hf else None
        prefill_vs_hf = hf.prefill_ms / r.prefill_ms if hf else None
        vs_loop = r.output_tok_s / floor.output_tok_s
        print(f"{r.system:24} {r.output_tok_s:10.1f} {r.ttft_ms:9.1f} {r.prefill_ms:10.1f} {r.tpot_ms:9.2f} "
              f"{'' if vs_hf is None else f'{vs_hf:6.2f}x':>7} {vs_loop:7.2f}x "
              f"{'' if prefill_vs_hf is None else f'{prefill_vs_hf:12.2f}x':>13}")
        rows.append({**{k: v for k, v in dataclasses.asdict(r).items() if k != "tokens"},
                     "vs_hf": vs_hf, "vs_loop": vs_loop, "prefill_vs_hf": prefill_vs_hf})
    if greedy:
        same = all(r.tokens == results[0].tokens for r in results)
        print(f"greedy tokens identical across systems: {same}")
        for row in rows:
            row["greedy_identical"] = same
    return rows


def sampling_share(args) -> list[dict]:
    """Time the sample program alone against one decode forward of the same batch (dense cache at the
    workload's context), each compiled on its own as the engine compiles them, and each timed two ways (see
    ``timed``): waited for call by call, and dispatched back to back as the overlapped decode loop runs.

    ``--logits flat`` samples the forward's own logits: random weights make them nearly flat, the worst case
    for a nucleus (it holds most of the vocabulary). ``peaked`` stands in for a trained model: per row a
    Zipf distribution (exponent 1.5, ranks in a random order), whose top-p 0.9 nucleus is about 60 tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jdisagg.sampler import branches_on_host_by_default
    from jdisagg.sampling import branches_for, sample_tokens

    config = dataclasses.replace(model_config(args.config, args.dtype), vocab_size=args.vocab)
    graphdef, state = nnx.split(random_model(config, seed=0))
    batch, context = args.batch, args.context
    kv = (batch, context, config.num_kv_heads, config.head_dim)
    caches = [(jnp.zeros(kv, config.dtype), jnp.zeros(kv, config.dtype)) for _ in range(config.num_layers)]
    rows = jnp.arange(batch)

    @jax.jit
    def forward(state, caches, tokens, positions):
        def attend(q, k, v, cache, window=None):
            kc, vc = cache[0].at[rows, positions].set(k), cache[1].at[rows, positions].set(v)
            grouped = q.reshape(batch, kc.shape[2], -1, q.shape[-1])
            scores = jnp.einsum("bkgd,bskd->bkgs", grouped, kc, preferred_element_type=jnp.float32)
            scores = jnp.where(jnp.arange(context) <= positions[:, None, None, None], scores, -jnp.inf)
            out = jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(scores, -1).astype(vc.dtype), vc)
            return out.reshape(q.shape), (kc, vc)

        return nnx.merge(graphdef, state).decode(tokens, positions, caches, attend)[0]

    def timed(fn, *fn_args) -> tuple[float, float]:
        """(synchronous, pipelined) seconds per call. Synchronous: median of calls each waited for, so it
        holds a dispatch and a host round trip. Pipelined: calls dispatched back to back and waited for
        once, as the engine's overlapped loop runs the sampler behind the forward; on an accelerator that
        is the program's device time (or the host's dispatch time, if that is longer)."""
        jax.block_until_ready(fn(*fn_args))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times.append(time.perf_counter() - start)
        calls = 5 * args.repeats
        start = time.perf_counter()
        for _ in range(calls):
            result = fn(*fn_args)
        jax.block_until_ready(result)
        return statistics.median(times), (time.perf_counter() - start) / calls

    tokens = jnp.ones(batch, jnp.int32)
    positions = jnp.full(batch, context - 1, jnp.int32)
    logits = forward(state, caches, tokens, positions)
    step_s, step_piped = timed(forward, state, caches, tokens, positions)
    # The one program with lax.conds, and where the engine would also run them (a GPU) or when asked, the
    # cond-free program of each mode's branches (jdisagg.sampler).
    host_branches = args.host_branches or branches_on_host_by_default(jax.devices()[0].platform)
    modes = {"greedy": (0.0, 0, 1.0), "temperature 0.8": (0.8, 0, 1.0), "top-p 0.9": (0.8, 0, 0.9),
             "top-k 50": (0.8, 50, 1.0), "top-k 50 + top-p 0.9": (0.8, 50, 0.9)}
    print(f"decode forward, batch {batch}, vocab {args.vocab}, context {context}: {1e3 * step_s:.2f} ms "
          f"synchronous, {1e3 * step_piped:.2f} ms pipelined")
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(args.vocab) for _ in range(batch)]) + 1
    kinds = {"flat": logits, "peaked": jnp.asarray(-1.5 * np.log(ranks), jnp.float32)}
    out = []
    for kind in args.logits.split(","):
        for name, (temperature, top_k, top_p) in modes.items():
            rows = (np.full(batch, temperature, np.float32), np.full(batch, top_k, np.int32),
                    np.full(batch, top_p, np.float32), np.full(batch, -1, np.int32),
                    np.zeros(batch, np.int32))  # temperature, top_k, top_p, forced, num_top
            programs = {"conds": None}
            if host_branches:
                programs["host-picked"] = branches_for(*rows, vocab_size=args.vocab)
            for program, branches in programs.items():
                sample = jax.jit(functools.partial(sample_tokens, branches=branches))
                sampled_s, sampled_piped = timed(
                    sample, kinds[kind].astype(jnp.float32), jnp.asarray(rows[0]), jnp.asarray(rows[1]),
                    jnp.asarray(rows[2]), jnp.arange(batch, dtype=jnp.uint32), positions + 1,
                    jnp.asarray(rows[3]), jnp.asarray(rows[4]))
                share = sampled_s / (step_s + sampled_s)
                piped_share = sampled_piped / (step_piped + sampled_piped)
                print(f"  {kind:6} {program:11} {name:20} synchronous {1e3 * sampled_s:6.2f} ms = "
                      f"{100 * share:5.1f}%, pipelined {1e3 * sampled_piped:6.3f} ms = "
                      f"{100 * piped_share:5.1f}%")
                out.append({"logits": kind, "program": program, "mode": name, "sample_ms": 1e3 * sampled_s,
                            "forward_ms": 1e3 * step_s, "share": share,
                            "sample_pipelined_ms": 1e3 * sampled_piped,
                            "forward_pipelined_ms": 1e3 * step_piped, "pipelined_share": piped_share})
    return out


def prefill_throughput(args) -> list[dict]:
    """Prefill of ``--batch`` prompts of ``--prompt-len`` tokens: HF transformers' forward as ``generate()``
    runs it (KV cache built, logits of the last token only) against one jdisagg prefill replica built the
    engine's way, through ``run_batch`` (the engine's path: batched prefill programs) and through ``run``
    one prompt at a time. Each system: the median wall time of ``--repeats`` runs after a warm-up, until every
    first token and KV is ready; the first tokens of the three are compared (greedy)."""
    import jax
    from flax import nnx

    from jdisagg.executors import PromptInput, SamplingRow
    from jdisagg.meshes import build_layout
    from jdisagg.replicas import build_prefill_replica
    from jdisagg.sizes import plan_sizes

    config = model_config(args.config, args.dtype)
    module = random_model(config, seed=0)
    batch_prompts = prompts(args.batch, args.prompt_len, config.vocab_size)
    context = 1 << (args.prompt_len - 1).bit_length()  # the prompt's own bucket is the largest one
    sizes = plan_sizes(config, page_size=16, max_batch=1, max_context=context, num_pages=None)
    mesh = build_layout("1x1", "1x1").prefill.replicas[0]
    replica = build_prefill_replica(0, mesh, *nnx.split(module), sizes)
    start, tasks = time.perf_counter(), replica.compile_tasks()
    for _, compile_program in tasks:
        compile_program()
    print(f"prefill replica: {len(tasks)} programs compiled in {time.perf_counter() - start:.1f} s (batched: "
          f"prompts per call by length {sizes.batched_prefill})")
    greedy = SamplingRow(0.0, 0, 1.0, 0)
    inputs = [PromptInput(p, greedy) for p in batch_prompts]

    def batched() -> list[int]:
        return [int(np.asarray(s.tokens)[0]) for s, _ in jax.block_until_ready(replica.run_batch(inputs))]

    def one_at_a_time() -> list[int]:
        results = jax.block_until_ready([replica.run(p, greedy) for p in batch_prompts])
        return [int(np.asarray(s.tokens)[0]) for s, _ in results]

    systems = {"jdisagg run_batch": batched, "jdisagg one at a time": one_at_a_time}
    if not args.no_hf:
        systems = {"HF transformers": hf_prefill(module, batch_prompts), **systems}
    timings, first_tokens = {}, {}
    for name, run in systems.items():
        first_tokens[name] = run()  # warm-up
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
        timings[name] = statistics.median(times)
    reference = timings.get("HF transformers")
    alone = timings["jdisagg one at a time"]
    tokens = args.batch * args.prompt_len
    floor, flops = matmul_floor(config, tokens, args.repeats)
    print(f"\nprefill of {args.batch} x {args.prompt_len} tokens ({args.config}, {args.dtype}); the model's "
          f"matmuls alone: {1e3 * floor:.1f} ms ({flops / 1e9:.0f} GFLOP, {flops / floor / 1e9:.0f} GFLOP/s)")
    print(f"{'system':24} {'ms':>9} {'prompt tok/s':>13} {'vs HF':>7} {'vs one at a time':>17} "
          f"{'matmuls / ms':>13}")
    rows = []
    for name, seconds in timings.items():
        vs_hf = reference / seconds if reference else None
        hf_ratio = "" if vs_hf is None else f"{vs_hf:6.2f}x"
        print(f"{name:24} {1e3 * seconds:9.1f} {tokens / seconds:13.1f} {hf_ratio:>7} "
              f"{alone / seconds:16.2f}x {floor / seconds:12.0%}")
        rows.append({"system": name, "batch": args.batch, "prompt_len": args.prompt_len, "ms": 1e3 * seconds,
                     "prompt_tok_s": tokens / seconds, "vs_hf": vs_hf, "vs_one_at_a_time": alone / seconds,
                     "matmul_floor_ms": 1e3 * floor, "of_matmul_floor": floor / seconds})
    same = all(t == first_tokens["jdisagg one at a time"] for t in first_tokens.values())
    print(f"greedy first tokens identical across systems: {same}")
    for row in rows:
        row["greedy_identical"] = same
    return rows


def matmul_floor(config, tokens: int, repeats: int) -> tuple[float, float]:
    """The hardware limit of a prefill on this machine: seconds (median of ``repeats``) and FLOPs of the
    model's projections alone on ``tokens`` rows, every layer's q/k/v, o, gate/up and down as one jitted
    program with nothing else (no attention, norms, rope or sampling, no lm_head: the prefill runs it on
    one row per prompt). Every system computes at least these matmuls, so its time over this one is the
    share of the machine's matmul rate it reaches."""
    import jax

    hidden, inner = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inner), (inner, hidden)]
    x_key, *keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    # N(0, 1/fan_in) keeps activations O(1) through the layers: no denormals to slow a CPU down
    weights = [(jax.random.normal(key, shape) * shape[0] ** -0.5).astype(config.dtype)
               for key, shape in zip(keys, shapes, strict=True)]
    x = jax.random.normal(x_key, (tokens, hidden)).astype(config.dtype)

    @jax.jit
    def projections(x, weights):
        qkv_w, o_w, gate_up_w, down_w = weights
        for _ in range(config.num_layers):
            x = (x @ qkv_w)[:, :q] @ o_w
            gate_up = x @ gate_up_w
            x = (gate_up[:, :inner] * gate_up[:, inner:]) @ down_w
        return x

    jax.block_until_ready(projections(x, weights))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(projections(x, weights))
        times.append(time.perf_counter() - begin)
    flops = 2 * tokens * config.num_layers * sum(a * b for a, b in shapes)
    return statistics.median(times), flops


def hf_prefill(module, batch_prompts):
    """HF transformers' prefill of the batch with ``module``'s weights: the forward ``generate()`` runs
    before its first token (``use_cache=True``, ``logits_to_keep=1``); returns a callable giving the greedy
    first tokens."""
    import torch
    import transformers

    from jdisagg.models import save_hf_safetensors

    directory = tempfile.mkdtemp(prefix="bench-hf-")
    save_hf_safetensors(module, directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor(batch_prompts)

    def run() -> list[int]:
        with torch.inference_mode():
            out = model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1).tolist()

    return run


def host_overhead(args) -> list[dict]:
    """Engine TPOT against the device's own step time on the demo model.

    The device step time is measured on a decode replica built the engine's way (fused projections, page
    tables as long as the live context, so the same decode[B, P] programs), with the steps chained on
    device (each step's sampled tokens feed the next, nothing read until the end), so it holds no host
    work at all. The engine's TPOT is the mean over ``--batch`` requests of ``--output-len`` tokens sent at
    once. Their ratio is what the host (scheduling, streaming, stop checks, page tables) adds per token.
    """
    import jax
    from flax import nnx

    from jdisagg import Engine, SamplingParams
    from jdisagg.executors import SamplingRow
    from jdisagg.meshes import build_layout
    from jdisagg.models.demo import load_demo_model
    from jdisagg.models.fused import fuse_projections
    from jdisagg.replicas import build_decode_replica
    from jdisagg.sizes import plan_sizes

    module = load_demo_model()
    sizes = plan_sizes(module.config, page_size=16, max_batch=args.batch, max_context=args.context,
                       num_pages=None)
    colocate = jax.device_count() < 2  # one accelerator: prefill and decode share it
    mesh = build_layout("1x1", "1x1", colocate=colocate).decode.replicas[0]
    graphdef, state = nnx.split(fuse_projections(module))  # the projections as the engine serves them
    replica = build_decode_replica(0, mesh, graphdef, state, sizes, args.attention_backend)
    for _, compile_program in replica.compile_tasks():
        compile_program()
    start_at = args.prompt_len
    pages = [list(range(1 + r * sizes.max_pages, 1 + (r + 1) * sizes.max_pages)) for r in range(args.batch)]
    rows = [SamplingRow(0.0, 0, 1.0, 0)] * args.batch
    forced = [-1] * args.batch

    def live(position: int) -> list[list[int]]:
        """The page tables the engine's step at ``position`` reads: as many pages as the live context."""
        return [row[: position // sizes.page_size + 1] for row in pages]

    def chain(steps: int) -> float:
        begin = time.perf_counter()
        step = replica.dispatch([1] * args.batch, [start_at] * args.batch, live(start_at), rows, forced)
        for i in range(1, steps):
            step = replica.dispatch(step, [start_at + i] * args.batch, live(start_at + i), rows, forced)
        replica.collect(step)
        return (time.perf_counter() - begin) / steps

    chain(4)  # warm-up
    device_step = statistics.median(chain(args.output_len) for _ in range(3))

    prompt_ids = prompts(args.batch, args.prompt_len, 256)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    with Engine(prefill_mesh="1x1", decode_mesh="1x1", max_batch=args.batch, max_context=args.context,
                colocate=colocate, attention_backend=args.attention_backend, progress=False) as engine:
        engine.generate(prompt_ids[:1], dataclasses.replace(params, max_tokens=2))
        if args.profile_host:
            from host_profile import ThreadSampler  # tools/, beside this script

            profiler = ThreadSampler()
            profiler.start()
        outputs = engine.generate(prompt_ids, params)
    tpot = statistics.mean(o.metrics.tpot for o in outputs)
    print(f"batch {args.batch}: device step {1e3 * device_step:.2f} ms, engine TPOT {1e3 * tpot:.2f} ms "
          f"({tpot / device_step:.3f}x the device step) on {jax.devices()[0].device_kind}")
    if args.profile_host:
        profiler.stop()
        print("where the stage threads spent the measured generate (stack samples):")
        # the decode loop, the thread that streams its tokens out, and the caller waiting in generate()
        threads = [n for n in profiler.samples if n.startswith(("decode", "output", "MainThread"))]
        print(profiler.report(threads))
    return [{"batch": args.batch, "device_step_ms": 1e3 * device_step, "engine_tpot_ms": 1e3 * tpot,
             "ratio": tpot / device_step}]


def context_sweep(args) -> list[dict]:
    from jdisagg import Engine, SamplingParams
    from jdisagg.compile_counter import compile_count
    from jdisagg.models.demo import load_demo_model
    from jdisagg.tokenizer import ByteTokenizer

    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    work = prompts(args.requests, args.prompt_len, 256)
    # The demo model with its position limit raised to the largest context (rope has no limit of its own):
    # the workload itself stays within the positions the model was trained on.
    module = load_demo_model()
    module.config = dataclasses.replace(module.config, max_position_embeddings=max(args.contexts))
    rows, reference = [], None
    print(f"{'max_context':>11} {'start-up s':>10} {'programs':>9} {'out tok/s':>10} {'TPOT ms':>8} "
          f"{'vs first':>9}")
    for context in args.contexts:
        before = compile_count()
        start = time.perf_counter()
        with Engine(module, tokenizer=ByteTokenizer(), prefill_mesh="1x1", decode_mesh="1x1",
                    max_batch=args.requests, max_context=context, progress=False) as engine:
            startup = time.perf_counter() - start
            compiled = compile_count() - before
            engine.generate(work[:1], dataclasses.replace(params, max_tokens=2))
            start = time.perf_counter()
            outputs = engine.generate(work, params)
            wall = time.perf_counter() - start
        tokens = [o.token_ids for o in outputs]
        reference = reference or tokens
        throughput = args.requests * args.output_len / wall
        first = rows[0]["output_tok_s"] if rows else throughput
        tpot = 1e3 * statistics.mean(o.metrics.tpot for o in outputs)
        print(f"{context:11d} {startup:10.1f} {compiled:9d} {throughput:10.1f} {tpot:8.1f} "
              f"{throughput / first:8.2f}x   tokens equal: {tokens == reference}")
        rows.append({"max_context": context, "startup_s": startup, "xla_compilations": compiled,
                     "output_tok_s": throughput, "tpot_ms": tpot, "vs_first": throughput / first,
                     "tokens_equal_first": tokens == reference})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731

    def logit_kinds(text: str) -> str:
        if not text or not set(text.split(",")) <= {"flat", "peaked"}:
            raise argparse.ArgumentTypeError(f"expected flat, peaked or flat,peaked, got {text!r}")
        return text

    p = sub.add_parser("peers", help="HF vs jdisagg vs a plain jitted JAX loop, same weights, same run")
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama-124m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=ints, default=[1, 16], help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers (e.g. on a GPU without torch)")
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="a persistent compile cache: engines after the first load their shared programs")
    p.add_argument("--separate-projections", action="store_true",
                   help="the plain loop runs q/k/v and gate/up as separate matmuls (default: fused)")
    c = sub.add_parser("context", help="decode throughput against max_context, same workload")
    c.add_argument("--contexts", type=ints, default=[256, 1024, 4096, 16384])
    c.add_argument("--requests", type=int, default=64)
    c.add_argument("--prompt-len", type=int, default=32)
    c.add_argument("--output-len", type=int, default=128)
    m = sub.add_parser("sampling", help="the sampler's share of a decode step")
    m.add_argument("--config", choices=sorted(CONFIGS), default="llama-124m")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    m.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3: 128,256)")
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--context", type=int, default=192)
    m.add_argument("--repeats", type=int, default=10)
    m.add_argument("--logits", default="flat,peaked", type=logit_kinds,
                   help="comma-separated: flat (the random model's own), peaked (Zipf, like a trained model)")
    m.add_argument("--host-branches", action="store_true",
                   help="also time the cond-free programs of each mode (the default on a GPU, as the engine)")
    f = sub.add_parser("prefill", help="prefill throughput: HF vs run_batch vs one prompt at a time")
    f.add_argument("--config", choices=sorted(CONFIGS), default="llama-124m")
    f.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    f.add_argument("--batch", type=int, default=16, help="prompts")
    f.add_argument("--prompt-len", type=int, default=128)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--no-hf", action="store_true", help="skip HF transformers (e.g. on a GPU without torch)")
    h = sub.add_parser("overhead", help="engine TPOT against the device step time (demo model)")
    h.add_argument("--batch", type=int, default=8)
    h.add_argument("--prompt-len", type=int, default=32)
    h.add_argument("--output-len", type=int, default=128)
    h.add_argument("--context", type=int, default=256)
    h.add_argument("--profile-host", action="store_true",
                   help="also sample the decode, output and main threads' stacks in the measured run "
                        "(tools/host_profile.py)")
    for sp in (p, h):
        sp.add_argument("--attention-backend", default=None,
                        help="the Engine's paged-attention backend (default: by platform; 'reference': XLA)")
    for sp in (p, c, m, f, h):
        sp.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    import jax

    commands = {"peers": peers, "context": context_sweep, "sampling": sampling_share,
                "overhead": host_overhead, "prefill": prefill_throughput}
    rows = commands[args.command](args)
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
            "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])])}
    print(f"\n{meta['date']}  {meta['machine']}  jax {jax.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
