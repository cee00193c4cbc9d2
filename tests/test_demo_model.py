"""The shipped demo model, measured through the serving path.

Held-out text (the last 5% of tinyshakespeare, never trained on) is scored by forcing it token by token
through prefill, the KV hand-off and decode steps on the paged cache (``Engine.score``). The result must
equal the training forward's loss on the same windows.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdisagg.engine import Engine
from jdisagg.models.demo import DEMO_DIR, load_demo_model

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 128  # bytes predicted per window


def _load_train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_demo = _load_train_demo()


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    assert (DEMO_DIR / "model.safetensors").exists(), "the demo weights are not shipped"
    _, val = train_demo.split_text()
    n = (len(val) - 1) // (WINDOW + 1)
    return np.stack([val[i * (WINDOW + 1) : (i + 1) * (WINDOW + 1)] for i in range(n)])


def _training_forward_bits(rows: np.ndarray) -> float:
    graphdef, state = nnx.split(load_demo_model())
    loss = jax.jit(lambda s, t: train_demo.next_token_loss(graphdef, s, jnp.asarray(t)))
    nats = [float(loss(state, rows[i : i + 32])) * len(rows[i : i + 32]) for i in range(0, len(rows), 32)]
    return sum(nats) / len(rows) / math.log(2)


def _serving_bits(engine: Engine, rows: np.ndarray) -> float:
    logprobs = engine.score_many([(row[:1].tolist(), row[1:].tolist()) for row in rows])
    return -float(np.mean(np.concatenate(logprobs))) / math.log(2)


def _served_and_reference(rows: np.ndarray, prefill: str, decode: str, colocate: bool) -> tuple[float, float]:
    with Engine(prefill_mesh=prefill, decode_mesh=decode, colocate=colocate, max_context=256, max_batch=16,
                progress=False) as engine:
        served = _serving_bits(engine, rows)
        assert engine.stats()["pages_used"] == [0] * len(engine.stats()["pages_used"])
    return served, _training_forward_bits(rows)


@pytest.fixture(scope="module")
def full_split(windows) -> tuple[float, float]:
    """Bits/byte of the whole held-out split, served on 4x1 -> 2x2, and the training forward's number."""
    return _served_and_reference(windows, "4x1", "2x2", False)


def test_full_split_through_serving_path_equals_training_forward(full_split):
    served, reference = full_split
    assert abs(served - reference) < 1e-3, full_split


@pytest.mark.parametrize(("prefill", "decode", "colocate"), [("2x1", "1x2", False), ("1x1", "1x1", True)])
def test_other_layouts_give_the_same_bits_per_byte(windows, prefill, decode, colocate):
    rows = windows[:: len(windows) // 48][:48]
    served, reference = _served_and_reference(rows, prefill, decode, colocate)
    assert abs(served - reference) < 1e-3, (served, reference)
