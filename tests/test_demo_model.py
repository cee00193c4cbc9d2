"""The shipped demo model, measured through the serving path.

Held-out text (the last 5% of tinyshakespeare, never trained on) is cut into strided windows: a 128-byte
prompt, then 128 bytes forced token by token through prefill, the KV hand-off and decode steps on the
paged cache (``Engine.score``). Every scored byte is predicted from the real text before it, part of it
read back from KV that crossed from the prefill mesh to the decode mesh, so a wrong mask, position or
hand-off shows up as a jump in bits/byte.

Two claims, each checked where it is cheap: the training forward (one jitted program, no serving code) on
the whole split gives the number recorded when the weights were trained, under the quality bar; and the
serving path gives the training forward's bits/byte, byte by byte, on a strided subset of the windows, on
the default disaggregated layout and colocated on one device. Scoring all 434 windows through the serving
path took minutes on the 2-core CI machine; 48 windows run the same programs, and are compared byte by byte
rather than as a mean.
"""

from __future__ import annotations

import importlib.util
import json
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
# The quality bar of issue 7; the shipped weights measure 2.121 (training.json).
MAX_BITS_PER_BYTE = 2.2


def _load_train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_demo = _load_train_demo()
PROMPT, SCORED = train_demo.EVAL_PROMPT, train_demo.EVAL_SCORED


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    assert (DEMO_DIR / "model.safetensors").exists(), "the demo weights are not shipped"
    return train_demo.held_out_windows(train_demo.split_text().validation)


# The windows served per layout: every 9th of the 434, three full batches of 16 over the whole split.
SERVED = np.arange(48) * 9


@pytest.fixture(scope="module")
def byte_nats(windows) -> np.ndarray:
    """Nats of every scored byte of the split, [windows, SCORED], by the training forward (the jitted
    ``token_losses`` that ``held_out_loss`` sums, in its batches of 32 rows)."""
    graphdef, state = nnx.split(load_demo_model())
    losses = jax.jit(train_demo.token_losses, static_argnums=0)
    batches = (jnp.asarray(windows[i : i + 32]) for i in range(0, len(windows), 32))
    return np.concatenate([np.asarray(losses(graphdef, state, batch))[:, -SCORED:] for batch in batches])


def _served_byte_nats(rows: np.ndarray, prefill: str, decode: str, colocate: bool) -> np.ndarray:
    """Nats of each scored byte, [rows, SCORED], forced through prefill, the hand-off and decode."""
    with Engine(prefill_mesh=prefill, decode_mesh=decode, colocate=colocate, max_context=PROMPT + SCORED,
                max_batch=16, progress=False) as engine:
        logprobs = engine.score_many([(row[:PROMPT].tolist(), row[PROMPT:].tolist()) for row in rows])
        assert engine.stats()["pages_used"] == [0] * len(engine.stats()["pages_used"])
    assert all(len(lp) == SCORED for lp in logprobs)
    return -np.asarray(logprobs)


def test_recorded_number_is_the_training_forward_on_the_full_split_and_meets_the_bar(windows, byte_nats):
    assert byte_nats.shape == (len(windows), SCORED) == (434, 128)
    bits = byte_nats.mean() / math.log(2)
    recorded = json.loads((DEMO_DIR / "training.json").read_text())["validation_bits_per_byte"]
    assert abs(bits - recorded) < 1e-3, (bits, recorded)
    assert bits <= MAX_BITS_PER_BYTE, f"held-out {bits:.4f} bits/byte"


@pytest.mark.parametrize(("prefill", "decode", "colocate"), [("4x1", "2x2", False), ("1x1", "1x1", True)])
def test_serving_path_gives_the_training_forwards_nats_byte_by_byte(windows, byte_nats, prefill, decode,
                                                                     colocate):
    """The default layout (TP-4 prefill to two TP-2 decode replicas: KV resharded and split over replicas)
    and colocated on one device. TP-2 prefill to two TP-1 decode replicas is the same path on other degrees;
    tests/test_engine.py checks greedy tokens on that layout and two more."""
    served = _served_byte_nats(windows[SERVED], prefill, decode, colocate)
    reference = byte_nats[SERVED]
    np.testing.assert_allclose(served, reference, atol=1e-3)
    served_bits, reference_bits = served.mean() / math.log(2), reference.mean() / math.log(2)
    assert abs(served_bits - reference_bits) < 1e-4, (served_bits, reference_bits)


def test_training_loss_is_the_served_models_forward_when_dropout_is_off():
    """``tools/train_demo.py`` rebuilds the forward to put dropout in; at rate 0 it must be the model's."""
    graphdef, state = nnx.split(load_demo_model())
    tokens = jnp.asarray(train_demo.split_text().train[:66].reshape(2, 33))
    served = train_demo.token_losses(graphdef, state, tokens).mean()
    trained = train_demo.dropout_loss(graphdef, state, tokens, 0.0, jax.random.key(0))
    assert abs(float(served) - float(trained)) < 1e-6
    dropped = train_demo.dropout_loss(graphdef, state, tokens, 0.5, jax.random.key(0))
    assert abs(float(dropped) - float(served)) > 1e-3  # dropout is really applied when asked for


def test_fitted_temperature_minimises_the_loss_and_folds_into_the_head_exactly():
    """The calibration step of ``tools/train_demo.py``: the fitted temperature is the loss minimum, and
    dividing the LM head by T divides the logits by T (so softening a model by 1.25 divides its fitted T by
    1.25)."""
    graphdef, state = nnx.split(load_demo_model())
    rows = train_demo.held_out_windows(train_demo.split_text().calibration)[:24]
    head_before = np.asarray(state["lm_head"]["kernel"][...])

    def loss_at(temperature: float) -> float:
        scaled = train_demo.with_temperature(graphdef, state, temperature)
        return train_demo.held_out_loss(graphdef, scaled, rows)

    fitted = train_demo.fit_temperature(graphdef, state, rows)
    assert loss_at(0.9 * fitted) > loss_at(fitted) < loss_at(1.1 * fitted)
    softened = train_demo.with_temperature(graphdef, state, 1.25)
    assert abs(train_demo.fit_temperature(graphdef, softened, rows) - fitted / 1.25) < 1e-3
    np.testing.assert_array_equal(np.asarray(state["lm_head"]["kernel"][...]), head_before)  # a copy


def test_shipped_model_carries_its_calibration():
    """The shipped head already includes the temperature fitted on the calibration slice (never trained on,
    disjoint from validation), so fitting again on that slice finds nothing left to correct."""
    graphdef, state = nnx.split(load_demo_model())
    rows = train_demo.held_out_windows(train_demo.split_text().calibration)
    assert abs(train_demo.fit_temperature(graphdef, state, rows) - 1.0) < 0.01
