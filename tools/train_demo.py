"""Train the built-in demo model: a byte-level Llama on tinyshakespeare, on CPU, seeded and reproducible.

    python tools/train_demo.py --eval-every 500 --out DIR    # the shipped recipe: 4500 steps, 80 min
    python tools/train_demo.py --steps 300 --lr 1e-3 --init jdisagg/models/demo --out DIR

The last 5% of ``tools/data/tinyshakespeare.txt`` is held out for validation; the 2.5% before it is a
calibration slice, also never trained on, that picks between the last and the averaged weights (``--ema``)
and fits the softmax temperature folded into the LM head (an over-confident model loses nats on unseen
text; dividing its logits by a temperature fitted on unseen text is the textbook fix, and folding it into
the head keeps the served model a plain Llama). The rest is training text. Params and optimizer state are
float32; the forward and backward run in ``--compute-dtype`` (bf16 by default: about 20% faster on CPU).

Writes an HF checkpoint (``config.json`` + ``model.safetensors`` in bf16) that ``Engine()`` loads when no
model is given, plus ``training.json`` with the command, wall time and final losses (validation measured
on ``held_out_windows``, as the serving-path test measures it). How the shipped weights were trained:
``docs/demo_model.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.models.llama import Llama
from jdisagg.models.loading import init_model, load_hf_model, save_hf_safetensors

DATA = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
VALIDATION_FRACTION = 0.05
CALIBRATION_FRACTION = 0.025
# Held-out bytes are scored with EVAL_PROMPT bytes of context at least (see held_out_windows); the two
# together are the model's training context.
EVAL_PROMPT, EVAL_SCORED = 128, 128


class Split(NamedTuple):
    """The text as byte arrays, in file order: train, then calibration, then validation (the last 5%)."""

    train: np.ndarray
    calibration: np.ndarray
    validation: np.ndarray


def split_text(path: Path = DATA) -> Split:
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)
    held_out = int(len(data) * (1 - VALIDATION_FRACTION))
    calibration = int(len(data) * (1 - VALIDATION_FRACTION - CALIBRATION_FRACTION))
    return Split(data[:calibration], data[calibration:held_out], data[held_out:])


def _next_token_task(tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(inputs, their positions, targets): predict ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return inputs, jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape), targets


def token_losses(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Cross-entropy (nats) of predicting each of ``tokens[:, 1:]`` from the tokens before it."""
    inputs, positions, targets = _next_token_task(tokens)
    logits = nnx.merge(graphdef, state)(inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def dropout_loss(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, rate: float, key: jax.Array
) -> jax.Array:
    """Mean ``token_losses`` with dropout on the embeddings and on each residual branch (training only).

    Built from the model's own blocks, so the served model carries no training-only code; at ``rate`` 0 it
    is exactly the model's forward."""
    from jdisagg.models.llama import causal_attention
    from jdisagg.models.rope import inverse_frequencies

    model = nnx.merge(graphdef, state)
    inputs, positions, targets = _next_token_task(tokens)
    keys = iter(jax.random.split(key, 1 + 2 * len(model.layers)))

    def drop(x: jax.Array) -> jax.Array:
        if rate == 0.0:  # a Python float: no mask is drawn at all
            return x
        keep = jax.random.bernoulli(next(keys), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0)

    inv_freq = inverse_frequencies(model.config)
    x = drop(model.embed_tokens(inputs))
    for layer in model.layers:
        q, k, v = layer.qkv(x, positions, inv_freq)
        x = x + drop(layer.self_attn.out(causal_attention(q, k, v).astype(x.dtype)))
        x = x + drop(layer.mlp(layer.post_attention_layernorm(x)))
    logits = model.logits(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def held_out_windows(data: np.ndarray, prompt: int = EVAL_PROMPT, scored: int = EVAL_SCORED) -> np.ndarray:
    """Rows of ``prompt`` bytes of context followed by ``scored`` bytes to predict, every ``scored`` bytes.

    The scored parts tile the text: every byte after the first ``prompt`` is predicted exactly once, from
    the ``prompt`` to ``prompt + scored - 1`` bytes before it (strided windows, the usual way to measure a
    fixed-context model on a long text). In serving terms a row is a prompt plus a forced continuation.
    """
    n = (len(data) - prompt) // scored
    return np.stack([data[i * scored : i * scored + prompt + scored] for i in range(n)])


def scored_nats(graphdef: nnx.GraphDef, state: nnx.State, rows: jax.Array, scored: int) -> jax.Array:
    """Summed cross-entropy (nats) of the last ``scored`` bytes of each row, given everything before them."""
    return token_losses(graphdef, state, rows)[:, -scored:].sum()


_jitted_scored_nats = jax.jit(scored_nats, static_argnums=(0, 3))  # compiled once per graph and shape


def held_out_loss(graphdef: nnx.GraphDef, state: nnx.State, rows: np.ndarray) -> float:
    """Mean nats per scored byte of ``held_out_windows`` rows (the training forward; no serving code)."""
    batches = (rows[i : i + 32] for i in range(0, len(rows), 32))
    total = sum(float(_jitted_scored_nats(graphdef, state, batch, EVAL_SCORED)) for batch in batches)
    return total / (len(rows) * EVAL_SCORED)


def fit_temperature(graphdef: nnx.GraphDef, state: nnx.State, rows: np.ndarray) -> float:
    """The softmax temperature that minimises the scored bytes' loss on ``rows`` (a 1-D convex fit).

    Cross-entropy is convex in the inverse temperature, so a golden-section search on [0.25, 4] finds it."""
    logits_of = jax.jit(lambda s, r: nnx.merge(graphdef, s)(*_next_token_task(r)[:2])[:, -EVAL_SCORED:])
    logits = jnp.concatenate([logits_of(state, rows[i : i + 32]) for i in range(0, len(rows), 32)])
    targets = jnp.asarray(rows[:, -EVAL_SCORED:])
    loss = jax.jit(lambda t: optax.softmax_cross_entropy_with_integer_labels(logits / t, targets).mean())
    lo, hi = 0.25, 4.0
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    return (lo + hi) / 2


def with_temperature(graphdef: nnx.GraphDef, state: nnx.State, temperature: float) -> nnx.State:
    """A copy of ``state`` whose LM head is divided by ``temperature``: its logits are ``logits / T``."""
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] / temperature
    return nnx.split(model)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4500, help="optimizer steps (default 4500)")
    parser.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    parser.add_argument("--context", type=int, default=EVAL_PROMPT + EVAL_SCORED,
                        help="bytes per window (default %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.15,
                        help="dropout on embeddings and residual branches while training (default 0.15)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    parser.add_argument("--ema", type=float, default=0.998,
                        help="also keep an exponential moving average of the weights with this decay per "
                             "step and ship whichever of it and the last weights has the lower calibration "
                             "loss (default 0.998; 0: the last weights)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the training forward and backward (params stay float32; default "
                             "%(default)s)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="measure the calibration-slice loss every N steps, shown in the progress bar "
                             "and kept in training.json as a curve (0: never)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a checkpoint this script wrote (fresh optimizer and schedule)")
    parser.add_argument("--out", type=Path, default=Path("jdisagg/models/demo"), help="output directory")
    args = parser.parse_args(argv)

    text = split_text()
    val_rows, calibration_rows = held_out_windows(text.validation), held_out_windows(text.calibration)
    rng = np.random.default_rng(args.seed)
    start_model = (load_hf_model(args.init, param_dtype=jnp.float32, progress=False) if args.init
                   else init_model(DEMO_CONFIG, seed=args.seed))
    graphdef, state = nnx.split(start_model)
    compute_dtype = jnp.dtype(args.compute_dtype)
    compute_graphdef = nnx.split(
        nnx.eval_shape(lambda: Llama(DEMO_CONFIG, rngs=nnx.Rngs(0), param_dtype=compute_dtype))
    )[0]
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps,
                                                  args.lr / 10)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, state)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.99, weight_decay=args.weight_decay, mask=decay_mask))
    opt_state = optimizer.init(state)
    average = state  # the EMA of the weights; only updated with --ema

    def loss_in_compute_dtype(state, tokens, key):
        compute_state = jax.tree.map(lambda x: x.astype(compute_dtype), state)
        return dropout_loss(compute_graphdef, compute_state, tokens, args.dropout, key)

    @jax.jit
    def step(state, opt_state, average, tokens, key):
        loss, grads = jax.value_and_grad(loss_in_compute_dtype)(state, tokens, key)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        if args.ema:
            average = jax.tree.map(lambda a, x: args.ema * a + (1.0 - args.ema) * x, average, state)
        return state, opt_state, average, loss

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    smoothed = math.log(DEMO_CONFIG.vocab_size)
    key = jax.random.key(args.seed)
    curve: list[dict[str, float]] = []
    for i in bar:
        offsets = rng.integers(0, len(text.train) - args.context - 1, args.batch)
        tokens = np.stack([text.train[o : o + args.context + 1] for o in offsets])
        state, opt_state, average, loss = step(state, opt_state, average, tokens, jax.random.fold_in(key, i))
        smoothed = 0.95 * smoothed + 0.05 * float(loss)
        if args.eval_every and (i + 1) % args.eval_every == 0:
            point = {"step": i + 1, "last": round(held_out_loss(graphdef, state, calibration_rows), 4)}
            if args.ema:
                point["ema"] = round(held_out_loss(graphdef, average, calibration_rows), 4)
            curve.append(point)
        shown = f"{min(v for k, v in curve[-1].items() if k != 'step'):.3f}" if curve else "-"
        bar.set_postfix(loss=f"{smoothed:.3f}", calibration=shown)
    train_seconds = time.perf_counter() - start  # calibration-slice evaluations included

    # Last or averaged weights, then the temperature: both chosen on the calibration slice, never on
    # validation.
    candidates = {"last": state} | ({"ema": average} if args.ema else {})
    before = {name: held_out_loss(graphdef, s, calibration_rows) for name, s in candidates.items()}
    chosen = min(before, key=before.get)
    temperature = fit_temperature(graphdef, candidates[chosen], calibration_rows)
    state = with_temperature(graphdef, candidates[chosen], temperature)

    # Ship bf16 (half the bytes); the engine loads the demo back as float32, as the evaluation below does.
    save_hf_safetensors(nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)), args.out)
    saved = nnx.split(load_hf_model(args.out, param_dtype=jnp.float32, progress=False))[1]
    val_loss = held_out_loss(graphdef, saved, val_rows)
    untempered = with_temperature(graphdef, saved, 1 / temperature)  # for the record, not for choosing
    untempered_val_loss = held_out_loss(graphdef, untempered, val_rows)
    train_loss = held_out_loss(graphdef, saved, held_out_windows(text.train[: len(text.validation)]))
    report = {
        "command": "python tools/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_seconds": round(train_seconds, 1),
        "device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
        "steps": args.steps, "batch": args.batch, "context": args.context, "lr": args.lr, "seed": args.seed,
        "dropout": args.dropout, "weight_decay": args.weight_decay, "ema": args.ema,
        "compute_dtype": compute_dtype.name,
        "calibration_curve": curve,
        "calibration_loss_nats": {name: round(loss, 4) for name, loss in before.items()},
        "shipped": chosen, "temperature": round(temperature, 4),
        "calibration_loss_after_temperature_nats": round(held_out_loss(graphdef, saved, calibration_rows), 4),
        "train_loss_nats": round(train_loss, 4),
        "validation_loss_nats": round(val_loss, 4),
        "validation_bits_per_byte": round(val_loss / math.log(2), 4),
        "validation_loss_without_temperature_nats": round(untempered_val_loss, 4),
        "note": "losses measured on the saved bf16 weights; train loss on the first 5% of the training text",
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
