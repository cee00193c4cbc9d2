"""Sliding-window models served end to end: the engine's greedy tokens equal transformers' greedy ones.

Prompts plus outputs run to nearly four times the window, so the prefill mask, the paged decode kernel's
window (the jnp reference; tests/test_kernels.py checks the Pallas kernels' window against the same oracle)
and the KV hand-off between meshes all matter. Qwen2 windows only its second layer, so one decode program
mixes windowed and full attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jdisagg.engine import Engine
from jdisagg.sampling_params import SamplingParams
from jdisagg.tokenizer import ByteTokenizer

WINDOW = 16
NEW_TOKENS = 36
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=WINDOW),
    "qwen2-window": lambda: transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """``name -> (model, directory)``: a tiny random float32 HF model saved as safetensors, built on first
    use; the model itself is the reference."""
    built = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            config = CONFIGS[name]()
            config._attn_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.05 * torch.randn_like(param))
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory, safe_serialization=True)
            built[name] = model, directory
        return built[name]

    return get


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    """Greedy tokens by transformers' full causal forward over the whole sequence, step by step.

    Not ``model.generate``: with transformers 5.24 its sliding-window cache gave other tokens than its own
    full forward once a 24-token prompt crossed the window, and the forward is the model as trained.
    """
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_greedy_matches_transformers_past_the_window(hf_checkpoints, name):
    hf_model, directory = hf_checkpoints(name)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (5, 24)]
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with Engine(directory, tokenizer=ByteTokenizer(), prefill_mesh="2x1", decode_mesh="2x1", max_context=64,
                page_size=8, max_batch=2, progress=False) as engine:
        assert engine.config.sliding_window == WINDOW
        outputs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(prompt) + NEW_TOKENS > 2 * WINDOW
        assert out.token_ids == _hf_greedy(hf_model, prompt), (name, len(prompt))
