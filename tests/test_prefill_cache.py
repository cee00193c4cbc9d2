"""The prefill replica's own prefix cache (``jdisagg.prefill_cache``): a long prompt whose leading chunks a
prefill replica already computed is prefilled only from its first uncached chunk.

A tiny Llama written as an HF checkpoint; 16-token pages, a 128-token context and a 32-token prefill chunk,
so a prompt past 32 tokens runs chunk by chunk and its full chunks are cached. Checked: the bookkeeping on
its own (keys, longest run, LRU order, budget); an engine (TP2 prefill with a cache of two chunks -> TP1
decode, both caches on) whose greedy outputs equal a dense single-device forward while the two caches hit
in every combination (both, only the prefill side, only the decode side) and an unrelated prompt evicts;
and a hit's hand-off bit for bit the uncached replica's (first token, log-probabilities, every KV piece),
whole and cut at decode-side hits. About 60 s on 2 idle cores, mostly compiling the two replicas once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_reference import dense_greedy
from flax import nnx
from jax.sharding import Mesh

from jdisagg.chunked_prefill import kv_pieces
from jdisagg.engine import Engine
from jdisagg.executors import PromptInput, SamplingRow
from jdisagg.meshes import TP_AXIS
from jdisagg.models import ModelConfig, load_hf_model
from jdisagg.models.loading import init_model, save_hf_safetensors
from jdisagg.prefill_cache import ChunkCache, default_cache_bytes
from jdisagg.replicas import build_decode_replica, build_prefill_replica
from jdisagg.sampling_params import SamplingParams
from jdisagg.sizes import ServingSizes, plan_sizes
from jdisagg.tokenizer import ByteTokenizer

MAX_CONTEXT, PAGE, CHUNK = 128, 16, 32
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
    tie_word_embeddings=False, attention_bias=False,
)
CHUNK_BYTES = default_cache_bytes(CHUNK, CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, "float32")
GREEDY = SamplingRow(0.0, 0, 1.0, 0, num_top=2)


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, CONFIG.vocab_size, n).tolist()


SHARED = _tokens(2 * CHUNK, seed=1)  # two full chunks


def _sizes(num_pages: int | None) -> ServingSizes:
    sizes = plan_sizes(CONFIG, page_size=PAGE, max_batch=2, max_context=MAX_CONTEXT, num_pages=num_pages)
    sizes = dataclasses.replace(sizes, prefill_chunk=CHUNK, max_prefill_batch=1)  # long prompts run alone
    assert sizes.chunked and sizes.prefill_buckets == (16, 32)
    return sizes


def _piece(fill: float) -> tuple[jax.Array, jax.Array]:
    k = jnp.full((CONFIG.num_layers, CHUNK, CONFIG.num_kv_heads, CONFIG.head_dim), fill, jnp.float32)
    return k, k


def test_a_negative_budget_is_refused_before_anything_is_built():
    with pytest.raises(ValueError, match="prefill_cache_gb"):
        Engine(None, prefill_cache_gb=-1.0, progress=False)


def test_chunk_cache_keeps_the_longest_leading_run_in_lru_order_within_its_budget():
    cache = ChunkCache(2 * CHUNK_BYTES, CHUNK, PAGE)
    a, b = SHARED + _tokens(20, 2), _tokens(3 * CHUNK, 3)
    keys_a, keys_b = cache.keys(a), cache.keys(b)
    assert len(keys_a) == 2 and len(keys_b) == 3 and cache.keys(a[:CHUNK - 1]) == []
    assert cache.keys(SHARED + _tokens(9, 4)) == keys_a  # a key names every token up to its chunk's end
    assert cache.lookup(keys_a) == [] and cache.hit_tokens == 0

    cache.store(keys_a, [_piece(0), _piece(1)])
    assert cache.chunks == 2 and cache.bytes == 2 * CHUNK_BYTES
    assert [float(k[0, 0, 0, 0]) for k, _ in cache.lookup(keys_a)] == [0, 1] and cache.hit_tokens == 2 * CHUNK
    other_start = cache.keys(_tokens(CHUNK, 5) + SHARED[CHUNK:])  # SHARED's second chunk after another first
    assert cache.lookup(keys_b) == [] and cache.lookup(other_start) == []

    cache.store(keys_b, [_piece(2), _piece(3), _piece(4)])  # the budget holds b's first two: a's are evicted
    assert cache.chunks == 2 and cache.evictions == 2 and cache.lookup(keys_a) == []
    assert len(cache.lookup(keys_b)) == 2

    cache.store(keys_a[:1], [_piece(0)])  # one more chunk: b's second goes (LRU), its first stays
    assert cache.evictions == 3 and len(cache.lookup(keys_b)) == 1 and len(cache.lookup(keys_a)) == 1
    assert cache.bytes == 2 * CHUNK_BYTES

    with pytest.raises(ValueError, match="multiple of page_size"):
        ChunkCache(CHUNK_BYTES, CHUNK + 1, PAGE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_hf_safetensors(init_model(CONFIG, seed=4), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return dense_greedy(checkpoint, MAX_CONTEXT)


def _prefill_replica(checkpoint, devices, cache_bytes: int | None):
    graphdef, state = nnx.split(load_hf_model(checkpoint))
    replica = build_prefill_replica(0, Mesh(np.array(devices), (TP_AXIS,)), graphdef, state, _sizes(None),
                                    prefill_cache_bytes=cache_bytes)
    for _, compile_program in replica.compile_tasks():
        compile_program()
    return replica


def _host(result) -> list[np.ndarray]:
    """A prefill result's samples and every array of its hand-off, on the host."""
    sampled, kv = result
    return [np.asarray(x) for x in sampled] + [np.asarray(x) for piece in kv_pieces(kv) for x in piece]


@pytest.fixture(scope="module")
def engine(checkpoint):
    """TP2 prefill (devices 0-1, a two-chunk cache) -> TP1 decode (device 2, 8 usable pages: one context)."""
    devices = jax.devices()
    graphdef, state = nnx.split(load_hf_model(checkpoint))
    sizes = _sizes(num_pages=MAX_CONTEXT // PAGE + 1)
    prefill = build_prefill_replica(0, Mesh(np.array(devices[:2]), (TP_AXIS,)), graphdef, state, sizes,
                                    prefill_cache_bytes=2 * CHUNK_BYTES)
    decode = build_decode_replica(0, Mesh(np.array(devices[2:3]), (TP_AXIS,)), graphdef, state, sizes, None,
                                  local_chunk=0)
    built = Engine.from_replicas(CONFIG, ByteTokenizer(), [prefill], [decode], sizes=sizes, progress=False,
                                 prefix_cache=True)
    yield built
    built.shutdown(drain=False)


def _counters(engine: Engine) -> tuple[float, float, float]:
    """(decode-side hit tokens, prefill-side hit tokens, prefill-side evictions) so far."""
    def sample(name: str) -> float:
        return engine.metrics.registry.get_sample_value(name, {"model_name": engine.model_name})

    return (engine.stats()["hit_tokens"], sample("jdisagg_prefill_cache_hit_tokens_total"),
            sample("jdisagg_prefill_cache_evictions_total"))


def test_greedy_outputs_equal_the_reference_whichever_side_holds_the_prefix(engine, reference):
    """Requests one after another, each row: (prompt, output tokens, hit on the decode side?, prefill-side
    hit tokens, prefill-side evictions). A short prompt with a long answer fills every decode page (evicting
    the decode side's copy of SHARED, which a short prompt never touches on the prefill side); an unrelated
    long prompt evicts SHARED's chunks on the prefill side, while the decode side keeps SHARED's first pages
    (a sequence's pages are released, so evicted, last page first)."""
    steps = [
        (SHARED + _tokens(16, 10), 4, False, 0, 0),  # neither: both sides cache SHARED
        (SHARED + _tokens(20, 11), 4, True, 2 * CHUNK, 0),  # both
        (_tokens(30, 12), 90, False, 0, 0),  # a short prompt: all 8 decode pages
        (SHARED + _tokens(18, 13), 4, False, 2 * CHUNK, 0),  # only the prefill side
        (_tokens(80, 14), 1, False, 0, 2),  # its two chunks evict SHARED's on the prefill side
        (SHARED + _tokens(22, 15), 4, True, 0, 2),  # only the decode side
    ]
    for prompt, n, decode_hit, prefill_hit, evictions in steps:
        before = _counters(engine)
        out = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert out.token_ids == reference(tuple(prompt), n)
        decode, prefill, evicted = (a - b for a, b in zip(_counters(engine), before, strict=True))
        assert (decode > 0, prefill, evicted) == (decode_hit, prefill_hit, evictions), len(prompt)
    stats = engine.stats()
    assert stats["pages_used"] == [0] and stats["remote_prefills"] == len(steps)


def test_a_prefill_hit_hands_off_exactly_what_the_uncached_replica_computes(checkpoint):
    """Same first token, log-probabilities and KV pieces bit for bit, whole and cut to a decode-side
    suffix, for a prompt whose two leading chunks are cached (and a third computed). The cached replica
    has the default budget: one full context of KV."""
    devices = jax.devices()  # the engine's prefill devices: its programs, loaded from the compile cache
    cached = _prefill_replica(checkpoint, devices[:2], None)
    uncached = _prefill_replica(checkpoint, devices[:2], 0)
    assert uncached.prefill_cache is None and cached.prefill_cache.chunks == 0
    assert cached.prefill_cache.budget_bytes == MAX_CONTEXT // CHUNK * CHUNK_BYTES
    first, second = SHARED + _tokens(10, 5), SHARED + _tokens(27, 6)
    cached.run_batch([PromptInput(first, GREEDY)])
    assert cached.prefill_cache.chunks == 2 and cached.prefill_cache.hit_tokens == 0
    for decode_hit in (0, PAGE, 3 * PAGE, 5 * PAGE):
        prompt = PromptInput(second, GREEDY, cached_tokens=decode_hit)
        (got,), (want,) = cached.run_batch([prompt]), uncached.run_batch([prompt])
        for g, w in zip(_host(got), _host(want), strict=True):
            np.testing.assert_array_equal(g, w)
    assert cached.prefill_cache.hit_tokens == 4 * 2 * CHUNK
