"""The shipped demo model, measured through the serving path.

Held-out text (the last 5% of tinyshakespeare, never trained on) is cut into strided windows: a 128-byte
prompt, then 128 bytes forced token by token through prefill, the KV hand-off and decode steps on the
paged cache (``Engine.score``). Every scored byte is predicted from the real text before it, part of it
read back from KV that crossed from the prefill mesh to the decode mesh, so a wrong mask, position or
hand-off shows up as a jump in bits/byte. The result must equal the training forward's on the same windows
and the number recorded when the weights were trained, and stay under the quality bar.
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


def _training_forward_bits(rows: np.ndarray) -> float:
    graphdef, state = nnx.split(load_demo_model())
    return train_demo.held_out_loss(graphdef, state, rows) / math.log(2)


def _serving_bits(engine: Engine, rows: np.ndarray) -> float:
    logprobs = engine.score_many([(row[:PROMPT].tolist(), row[PROMPT:].tolist()) for row in rows])
    assert all(len(lp) == SCORED for lp in logprobs)
    return -float(np.mean(np.concatenate(logprobs))) / math.log(2)


def _served_and_reference(rows: np.ndarray, prefill: str, decode: str, colocate: bool) -> tuple[float, float]:
    with Engine(prefill_mesh=prefill, decode_mesh=decode, colocate=colocate, max_context=PROMPT + SCORED,
                max_batch=16, progress=False) as engine:
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


def test_shipped_model_is_the_one_measured_at_training_and_meets_the_bar(full_split):
    served, _ = full_split
    recorded = json.loads((DEMO_DIR / "training.json").read_text())["validation_bits_per_byte"]
    assert abs(served - recorded) < 1e-3, (served, recorded)
    assert served <= MAX_BITS_PER_BYTE, f"held-out {served:.4f} bits/byte through the serving path"


@pytest.mark.parametrize(("prefill", "decode", "colocate"), [("2x1", "1x2", False), ("1x1", "1x1", True)])
def test_other_layouts_give_the_same_bits_per_byte(windows, prefill, decode, colocate):
    rows = windows[:: len(windows) // 48][:48]
    served, reference = _served_and_reference(rows, prefill, decode, colocate)
    assert abs(served - reference) < 1e-3, (served, reference)


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
