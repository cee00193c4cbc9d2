"""Train the built-in demo model: a byte-level Llama on tinyshakespeare, on CPU, seeded and reproducible.

    python tools/train_demo.py --steps 1500 --out jdisagg/models/demo

The first 95% of ``tools/data/tinyshakespeare.txt`` is training text, the last 5% is held out. Writes an HF
checkpoint (``config.json`` + ``model.safetensors`` in bf16) that ``Engine()`` loads when no model is given,
plus ``training.json`` with the command, wall time and final train/validation loss.
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


def split_text(path: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) byte arrays: validation is the last 5% of the file."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)
    cut = int(len(data) * (1 - VALIDATION_FRACTION))
    return data[:cut], data[cut:]


def next_token_loss(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats/byte) of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
    model = nnx.merge(graphdef, state)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits = model(inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def evaluate(graphdef: nnx.GraphDef, state: nnx.State, data: np.ndarray, context: int) -> float:
    """Mean loss over non-overlapping windows of the whole array (each window predicts ``context`` bytes)."""
    loss = jax.jit(lambda s, t: next_token_loss(graphdef, s, t))
    n = (len(data) - 1) // context
    windows = np.stack([data[i * context : i * context + context + 1] for i in range(n)])
    losses = [float(loss(state, windows[i : i + 32])) * len(windows[i : i + 32]) for i in range(0, n, 32)]
    return sum(losses) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--batch", type=int, default=32, help="windows per step (default 32)")
    parser.add_argument("--context", type=int, default=128, help="bytes per window (default 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a checkpoint this script wrote (fresh optimizer and schedule)")
    parser.add_argument("--out", type=Path, default=Path("jdisagg/models/demo"), help="output directory")
    args = parser.parse_args(argv)

    train, val = split_text()
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
    def step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda s: next_token_loss(graphdef, s, tokens))(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    smoothed = math.log(DEMO_CONFIG.vocab_size)
    for _ in bar:
        offsets = rng.integers(0, len(train) - args.context - 1, args.batch)
        tokens = np.stack([train[o : o + args.context + 1] for o in offsets])
        state, opt_state, loss = step(state, opt_state, tokens)
        smoothed = 0.95 * smoothed + 0.05 * float(loss)
        bar.set_postfix(loss=f"{smoothed:.3f}")
    train_seconds = time.perf_counter() - start

    # Ship bf16 (half the bytes); the engine loads the demo back as float32, as the evaluation below does.
    save_hf_safetensors(nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)), args.out)
    saved = nnx.split(load_hf_model(args.out, param_dtype=jnp.float32, progress=False))[1]
    val_loss = evaluate(graphdef, saved, val, args.context)
    train_loss = evaluate(graphdef, saved, train[: len(val)], args.context)
    report = {
        "command": "python tools/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_seconds": round(train_seconds, 1),
        "device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
        "steps": args.steps, "batch": args.batch, "context": args.context, "lr": args.lr, "seed": args.seed,
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
