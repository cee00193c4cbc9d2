"""The prefix cache and local prefill end to end: real engines, compiled programs and KV hand-offs, greedy
outputs against a single-device dense forward that never caches anything.

A tiny Llama written as an HF checkpoint; 16-token pages and 12 usable pages per decode replica, so a few
concurrent sequences run out of pages (preemption) and finished ones' cached pages are evicted. Layouts:
prefill TP2 -> two TP1 decode replicas (the hand-off reshards) with the cache on and off, and colocated on
one device with every prompt prefilled locally in chunks (the colocated default on GPU/TPU; on the CPU it is
asked for, as the CPU's default prefills whole prompts on the prefill thread).
"""

from __future__ import annotations

import numpy as np
import pytest
from dense_reference import dense_greedy

from jdisagg.engine import Engine
from jdisagg.models import ModelConfig
from jdisagg.models.loading import init_model, save_hf_safetensors
from jdisagg.sampling_params import SamplingParams
from jdisagg.tokenizer import ByteTokenizer

MAX_CONTEXT = 128
PAGE = 16
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
    tie_word_embeddings=False, attention_bias=False,
)
LAYOUTS = {
    "disaggregated": {"prefill_mesh": "2x1", "decode_mesh": "1x2", "local_prefill_tokens": 16},
    "disaggregated-no-cache": {"prefill_mesh": "2x1", "decode_mesh": "1x2", "prefix_cache": False},
    "colocated": {"colocate": True, "local_prefill_tokens": MAX_CONTEXT},
}


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, CONFIG.vocab_size, n).tolist()


SHARED = _tokens(40, seed=1)  # two full pages and a bit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_hf_safetensors(init_model(CONFIG, seed=4), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy continuation by a dense forward on one device over the whole sequence, every token."""
    return dense_greedy(checkpoint, MAX_CONTEXT)


@pytest.fixture(scope="module")
def engines(checkpoint):
    """The layouts' engines, built the first time a test asks for one."""
    built: dict[str, Engine] = {}

    def get(layout: str) -> Engine:
        if layout not in built:
            built[layout] = Engine(
                checkpoint, tokenizer=ByteTokenizer(), max_context=MAX_CONTEXT, max_batch=2, page_size=PAGE,
                num_pages=13, progress=False, **LAYOUTS[layout],
            )
        return built[layout]

    yield get
    for engine in built.values():
        engine.shutdown(drain=False)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _preemptions(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value(
        "jdisagg_preemptions_total", {"model_name": engine.model_name}
    )


def test_a_shared_two_page_prefix_is_a_hit_and_only_the_rest_is_handed_off(engines, reference):
    engine = engines("disaggregated")
    first, second, short = SHARED + _tokens(20, 2), SHARED + _tokens(30, 3), SHARED + _tokens(5, 4)
    out = engine.generate([first], _greedy(6))[0]
    assert out.token_ids == reference(tuple(first), 6)
    before = engine.stats()
    out = engine.generate([second], _greedy(6))[0]
    after = engine.stats()
    assert out.token_ids == reference(tuple(second), 6)
    assert after["hit_tokens"] - before["hit_tokens"] == 2 * PAGE
    assert after["handoff_tokens"] - before["handoff_tokens"] == len(second) - 2 * PAGE
    # 13 uncached tokens (<= local_prefill_tokens): prefilled on the decode replica, nothing handed off.
    out = engine.generate([short], _greedy(6))[0]
    assert out.token_ids == reference(tuple(short), 6)
    final = engine.stats()
    assert final["local_prefills"] == after["local_prefills"] + 1
    assert final["handoff_tokens"] == after["handoff_tokens"] and final["hit_tokens"] > after["hit_tokens"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_outputs_equal_the_uncached_reference_after_eviction_and_preemption(engines, reference,
                                                                                  layout):
    """Six concurrent conversations' next turns from two shared prefixes: more KV than the pages hold."""
    engine = engines(layout)
    prompts = [prefix + _tokens(12 + 7 * i, 10 + i) for i, prefix in enumerate([SHARED, _tokens(36, 5)] * 3)]
    preempted, evicted = _preemptions(engine), engine.stats()["evictions"]
    outputs = engine.generate(prompts, _greedy(40))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == reference(tuple(prompt), 40)
    stats = engine.stats()
    assert _preemptions(engine) > preempted and stats["pages_used"] == [0] * len(stats["pages_used"])
    if layout == "disaggregated-no-cache":
        assert stats["hit_tokens"] == stats["pages_cached"][0] == 0
    else:
        assert stats["evictions"] > evicted and stats["hit_tokens"] > 0
    if layout == "colocated":
        assert stats["remote_prefills"] == 0 and stats["local_prefills"] >= len(prompts)
