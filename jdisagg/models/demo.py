"""The built-in demo model: a small byte-level Llama, so ``jdisagg`` serves something with no downloads.

Its trained weights ship in ``demo/model.safetensors`` once the training task has produced them; until
then (or if they are removed) the same architecture is initialised randomly with a fixed seed, which
exercises every code path but generates noise — hence the warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jdisagg.models.config import ModelConfig
from jdisagg.models.llama import Llama
from jdisagg.models.loading import ShardingFn, init_model, load_hf_model
from jdisagg.models.safetensors_reader import SINGLE_FILE

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"

DEMO_CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    attention_bias=False,
    dtype="float32",
)


def load_demo_model(shardings: ShardingFn | None = None) -> Llama:
    """The trained demo weights when shipped, else a seed-0 random init of ``DEMO_CONFIG``.

    Shipped weights may be stored narrower (bf16, to keep the package small); they are widened to
    ``DEMO_CONFIG.dtype`` so the demo model always is ``DEMO_CONFIG``.
    """
    if (DEMO_DIR / SINGLE_FILE).exists():
        return load_hf_model(DEMO_DIR, shardings=shardings, param_dtype=DEMO_CONFIG.dtype, progress=False)
    log.warning("demo weights %s not found: serving an untrained (random) demo model", DEMO_DIR / SINGLE_FILE)
    return init_model(DEMO_CONFIG, 0, shardings=shardings)
