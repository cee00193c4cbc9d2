"""Train the built-in demo model: a byte-level Llama on tinyshakespeare, on CPU, seeded and reproducible.

    python tools/train_demo.py --steps 1500 --out jdisagg/models/demo
    python tools/train_demo.py --steps 450 --lr 1e-3 --dropout 0.15 --init jdisagg/models/demo --out DIR

The first 95% of ``tools/data/tinyshakespeare.txt`` is training text, the last 5% is held out. Writes an HF
checkpoint (``config.json`` + ``model.safetensors`` in bf16) that ``Engine()`` loads when no model is given,
plus ``training.json`` with the command, wall time and final train/validation loss (measured on
``held_out_windows``, as the serving-path test measures it). How the shipped weights were trained:
``docs/demo_model.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.models.loading import init_model, load_hf_model, save_hf_safetensors

DATA = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
VALIDATION_FRACTION = 0.05
# Held-out bytes are scored with EVAL_PROMPT bytes of context at least (see held_out_windows); the two
# together are the model's training context.
EVAL_PROMPT, EVAL_SCORED = 128, 128


def split_text(path: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) byte arrays: validation is the last 5% of the file."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)
    cut = int(len(data) * (1 - VALIDATION_FRACTION))
    return data[:cut], data[cut:]


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


def held_out_loss(graphdef: nnx.GraphDef, state: nnx.State, rows: np.ndarray) -> float:
    """Mean nats per scored byte of ``held_out_windows`` rows (the training forward; no serving code)."""
    nats = jax.jit(lambda s, r: scored_nats(graphdef, s, r, EVAL_SCORED))
    total = sum(float(nats(state, rows[i : i + 32])) for i in range(0, len(rows), 32))
    return total / (len(rows) * EVAL_SCORED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--batch", type=int, default=16, help="windows per step (default 16)")
    parser.add_argument("--context", type=int, default=EVAL_PROMPT + EVAL_SCORED,
                        help="bytes per window (default %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout on embeddings and residual branches while training (default 0)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="measure the held-out loss every N steps, shown in the progress bar and kept in "
                             "training.json as a curve (the last weights are shipped either way; 0: never)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a checkpoint this script wrote (fresh optimizer and schedule)")
    parser.add_argument("--out", type=Path, default=Path("jdisagg/models/demo"), help="output directory")
    args = parser.parse_args(argv)

    train, val = split_text()
    val_rows = held_out_windows(val)
    rng = np.random.default_rng(args.seed)
    start_model = (load_hf_model(args.init, param_dtype=jnp.float32, progress=False) if args.init
                   else init_model(DEMO_CONFIG, seed=args.seed))
    graphdef, state = nnx.split(start_model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps,
                                                  args.lr / 10)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, state)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.99, weight_decay=0.1, mask=decay_mask))
    opt_state = optimizer.init(state)

    @jax.jit
    def step(state, opt_state, tokens, key):
        loss, grads = jax.value_and_grad(dropout_loss, argnums=1)(graphdef, state, tokens, args.dropout, key)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    smoothed = math.log(DEMO_CONFIG.vocab_size)
    key = jax.random.key(args.seed)
    curve: list[tuple[int, float]] = []
    for i in bar:
        offsets = rng.integers(0, len(train) - args.context - 1, args.batch)
        tokens = np.stack([train[o : o + args.context + 1] for o in offsets])
        state, opt_state, loss = step(state, opt_state, tokens, jax.random.fold_in(key, i))
        smoothed = 0.95 * smoothed + 0.05 * float(loss)
        if args.eval_every and (i + 1) % args.eval_every == 0:
            curve.append((i + 1, round(held_out_loss(graphdef, state, val_rows), 4)))
        bar.set_postfix(loss=f"{smoothed:.3f}", val=f"{curve[-1][1]:.3f}" if curve else "-")
    train_seconds = time.perf_counter() - start  # held-out evaluations included

    # Ship bf16 (half the bytes); the engine loads the demo back as float32, as the evaluation below does.
    save_hf_safetensors(nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)), args.out)
    saved = nnx.split(load_hf_model(args.out, param_dtype=jnp.float32, progress=False))[1]
    val_loss = held_out_loss(graphdef, saved, val_rows)
    train_loss = held_out_loss(graphdef, saved, held_out_windows(train[: len(val)]))
    report = {
        "command": "python tools/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_seconds": round(train_seconds, 1),
        "device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
        "steps": args.steps, "batch": args.batch, "context": args.context, "lr": args.lr, "seed": args.seed,
        "dropout": args.dropout, "validation_curve": curve,
        "train_loss_nats": round(train_loss, 4),
        "validation_loss_nats": round(val_loss, 4),
        "validation_bits_per_byte": round(val_loss / math.log(2), 4),
        "note": "losses measured on the saved bf16 weights; train loss on the first 5% of the training text",
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
