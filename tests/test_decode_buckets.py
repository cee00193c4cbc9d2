"""Decode reads the live context: page tables are cut to the smallest compiled width that holds the longest
sequence in the batch, and a batch whose longest sequence crosses a width boundary switches program without
changing a token (greedy against a dense, unpaged forward) and without compiling anything while serving."""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_greedy

from jdisagg.compile_counter import cache_hit_count, compile_count
from jdisagg.engine import Engine
from jdisagg.models import ModelConfig
from jdisagg.models.loading import init_model, save_hf_safetensors
from jdisagg.sampling_params import SamplingParams
from jdisagg.sizes import ServingSizes
from jdisagg.tokenizer import ByteTokenizer

MAX_CONTEXT = 512
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=MAX_CONTEXT,
    tie_word_embeddings=False, attention_bias=False,
)


def test_page_table_widths_start_at_256_tokens_and_double():
    assert ServingSizes(16, 8, 256, 20).page_buckets == (16,)
    assert ServingSizes(16, 8, 4096, 300).page_buckets == (16, 32, 64, 128, 256)
    assert ServingSizes(16, 8, 128, 20).page_buckets == (8,)  # a context below 256 tokens: one width
    assert ServingSizes(64, 8, 1024, 20).page_buckets == (4, 8, 16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bucket_llama")
    save_hf_safetensors(init_model(CONFIG, seed=3), path)
    return path


def test_a_batch_crossing_a_width_boundary_keeps_its_tokens(checkpoint):
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, 256, 250).tolist()  # 250 + 16 tokens: from the 256-token width to 512
    short_prompt = rng.integers(0, 256, 9).tolist()
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with Engine(checkpoint, tokenizer=ByteTokenizer(), prefill_mesh="1x1", decode_mesh="1x1", max_batch=2,
                page_size=64, max_context=MAX_CONTEXT, progress=False) as engine:
        warm = compile_count(), cache_hit_count()  # the suite's compile cache: a load is no compile
        outputs = engine.generate([long_prompt, short_prompt], params)
        assert (compile_count(), cache_hit_count()) == warm, "a page-table width was compiled while serving"
        assert engine.stats()["pages_used"] == [0]
    generate = dense_greedy(checkpoint, MAX_CONTEXT)
    assert outputs[0].token_ids == generate(tuple(long_prompt), 16)
    assert outputs[1].token_ids == generate(tuple(short_prompt), 16)
