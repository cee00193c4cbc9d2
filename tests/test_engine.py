"""End-to-end engine tests on 8 virtual CPU devices, against a single-device, non-paged reference.

The model is a tiny Llama written to disk as an HF safetensors checkpoint, so every test also exercises
loading. Heads are 8 query / 2 kv: with tp=4 the kv heads are replicated, with tp=2 split.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
import pytest
from dense_reference import dense_greedy

from jdisagg.compile_counter import cache_hit_count, compile_count
from jdisagg.engine import Engine
from jdisagg.models import ModelConfig
from jdisagg.models.loading import init_model, load_hf_model, save_checkpoint, save_hf_safetensors
from jdisagg.outputs import FinishReason
from jdisagg.sampling_params import SamplingParams
from jdisagg.stages import SWITCH_INTERVAL_S
from jdisagg.tokenizer import ByteTokenizer

MAX_CONTEXT = 128
CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    attention_bias=False,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_hf_safetensors(init_model(CONFIG, seed=1), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy continuation by a dense, unpaged forward on one device (recomputes the whole prefix)."""
    return dense_greedy(checkpoint, MAX_CONTEXT)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def _engine(checkpoint, prefill, decode, **kw):
    kw.setdefault("max_context", MAX_CONTEXT)
    kw.setdefault("max_batch", 4)
    return Engine(
        checkpoint, tokenizer=ByteTokenizer(), prefill_mesh=prefill, decode_mesh=decode, progress=False, **kw
    )


def _assert_no_pages(engine):
    stats = engine.stats()
    assert stats["pages_used"] == [0] * len(stats["pages_used"]), stats


# TP-4 prefill (kv heads replicated) to two TP-2 decode replicas, colocated on one device, and two TP-2
# prefill replicas to two TP-1 decode replicas (four, as before, compiled the most programs of this file and
# add no code path: picking among replicas is the scheduler's, tests/test_scheduler.py). One TP-2 prefill
# replica to two TP-1 decode replicas is checked against the same reference by
# test_flood_larger_than_page_pool_preempts_and_still_matches.
@pytest.mark.parametrize(
    ("prefill", "decode", "colocate"),
    [("4x1", "2x2", False), ("1x1", "1x1", True), ("2x2", "1x2", False)],
)
def test_greedy_matches_reference_on_every_layout(checkpoint, reference, prefill, decode, colocate):
    prompts = _prompts([3, 17, 40, 70, 1, 33])
    with _engine(checkpoint, prefill, decode, colocate=colocate) as engine:
        warm = compile_count(), cache_hit_count()  # the suite's compile cache: a load is no compile
        assert warm[0] == engine.warm_compile_count
        streams = [engine.submit(p, SamplingParams(max_tokens=12)) for p in prompts]  # all in flight at once
        outputs = [s.result(timeout=300) for s in streams]
        assert (compile_count(), cache_hit_count()) == warm, "serving compiled or loaded a program"
        _assert_no_pages(engine)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.finish_reason == FinishReason.LENGTH
        assert out.token_ids == reference(tuple(prompt), 12), (prefill, decode, len(prompt))


def test_pallas_interpret_kernel_end_to_end(checkpoint, reference):
    prompts = _prompts([5, 20], seed=3)
    with _engine(checkpoint, "1x1", "2x1", attention_backend="interpret", max_batch=2) as engine:
        outputs = engine.generate(prompts, SamplingParams(max_tokens=4))
        for prompt, out in zip(prompts, outputs, strict=True):
            assert out.token_ids == reference(tuple(prompt), 4)
        _assert_no_pages(engine)


def test_flood_larger_than_page_pool_preempts_and_still_matches(checkpoint, reference):
    """Greedy tokens equal the reference, and seeded sampling gives a preempted request the very tokens it
    gets when it runs alone (its keys depend on seed and position only, not on the recompute)."""
    prompts = _prompts([30, 45, 20, 60, 10, 50, 35, 25], seed=7)
    # 13 usable pages of 8 tokens: two long sequences fill the pool, so decode must preempt and recompute.
    with _engine(checkpoint, "2x1", "1x2", page_size=8, num_pages=14, max_batch=4, max_context=96) as engine:
        outputs = engine.generate(prompts, SamplingParams(max_tokens=30))
        for prompt, out in zip(prompts, outputs, strict=True):
            assert out.token_ids == reference(tuple(prompt), 30)
        assert sum(o.metrics.preemptions for o in outputs) > 0
        _assert_no_pages(engine)

        seeded = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.95, seed=2024)
        crowd = engine.generate(prompts, seeded)
        preempted = [(p, o) for p, o in zip(prompts, crowd, strict=True) if o.metrics.preemptions]
        assert preempted
        for prompt, out in preempted:
            alone = engine.generate([prompt], seeded)[0]
            assert alone.metrics.preemptions == 0
            assert out.token_ids == alone.token_ids


@pytest.fixture(scope="module")
def engine(checkpoint):
    with _engine(checkpoint, "2x1", "2x2") as e:
        yield e


def test_abort_mid_generation_frees_pages(engine):
    stream = engine.submit(_prompts([20])[0], SamplingParams(max_tokens=100))
    first = stream.next_chunk(timeout=120)
    assert first.token_ids
    assert engine.stats()["pages_used"] != [0, 0]
    assert stream.cancel()
    out = stream.result(timeout=60)
    assert out.finish_reason == FinishReason.ABORT
    assert len(out.token_ids) < 100
    _assert_no_pages(engine)


def test_abort_while_waiting_and_unknown_id(engine):
    assert not engine.abort("no-such-request")
    streams = [engine.submit(p, SamplingParams(max_tokens=50)) for p in _prompts([10] * 12, seed=5)]
    for s in streams[::2]:
        s.cancel()
    outs = [s.result(timeout=120) for s in streams]
    assert all(o.finish_reason == FinishReason.ABORT for o in outs[::2])
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs[1::2])
    _assert_no_pages(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(engine, reference):
    prompt = _prompts([12], seed=11)[0]
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    alone = engine.generate([prompt], params)[0].token_ids
    crowd = engine.generate([prompt] + _prompts([5, 9, 30], seed=12), params)[0].token_ids
    assert alone == crowd
    other = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.8, seed=99))[0].token_ids
    assert other != alone
    top1 = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=5))[0]
    assert top1.token_ids == reference(tuple(prompt), 10)


def test_stop_token_ids(engine, reference):
    """Stop strings need readable text to be deterministic: tests/test_stop_strings.py (demo model)."""
    prompt = _prompts([9], seed=21)[0]
    expected = reference(tuple(prompt), 12)
    stop_id = expected[4]
    cut = expected.index(stop_id)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == expected[: cut + 1]
    _assert_no_pages(engine)


def test_streaming_chunks_concatenate_to_output(engine, reference):
    prompt = _prompts([15], seed=31)[0]
    stream = engine.submit(prompt, SamplingParams(max_tokens=8))
    chunks = list(stream)
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert [t for c in chunks for t in c.token_ids] == reference(tuple(prompt), 8)
    assert "".join(c.text for c in chunks) == stream.result().text
    assert stream.result().metrics.ttft > 0


def _metric(engine, name: str, **labels: str) -> float:
    """Sum of the engine's samples called ``name`` that carry ``labels`` (model_name left out)."""
    return sum(s.value for family in engine.metrics.registry.collect() for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_inter_token_latency_metric_observes_every_gap(engine):
    """One ITL observation per token after the first, summing to the gaps the stream's tokens arrived at."""
    count, total = (_metric(engine, f"jdisagg_inter_token_latency_seconds_{s}") for s in ("count", "sum"))
    out = engine.generate(_prompts([11], seed=61), SamplingParams(max_tokens=9))[0]
    assert _metric(engine, "jdisagg_inter_token_latency_seconds_count") - count == 8
    gaps = np.diff(out.metrics.token_times).sum()
    assert _metric(engine, "jdisagg_inter_token_latency_seconds_sum") - total == pytest.approx(gaps, abs=1e-6)


def test_a_running_engine_keeps_gil_hand_offs_short(engine):
    """The decode thread gives up the GIL in every launch and read; at Python's default 5 ms switch
    interval it could wait that long to get it back, several steps on a GPU."""
    assert sys.getswitchinterval() <= SWITCH_INTERVAL_S < 0.005


def test_queue_depth_metric_counts_waiting_requests(engine):
    # Holding the scheduler's lock keeps the prefill threads from taking what is submitted meanwhile.
    with engine._cv:
        streams = [engine.submit(p, SamplingParams(max_tokens=2)) for p in _prompts([7, 8, 9], seed=71)]
        assert _metric(engine, "jdisagg_queue_depth", stage="waiting") == 3
    for s in streams:
        s.result(timeout=120)
    for stage in ("waiting", "transfer", "decode_inbox"):
        assert _metric(engine, "jdisagg_queue_depth", stage=stage) == 0, stage


def test_compile_count_metric_is_the_process_count_and_stays_flat_while_serving(engine):
    before = _metric(engine, "jdisagg_compilations_total")
    assert before == compile_count() >= engine.warm_compile_count > 0
    engine.generate(_prompts([3, 30, 60], seed=81), SamplingParams(max_tokens=3))
    assert _metric(engine, "jdisagg_compilations_total") == before
    salt = float(time.time_ns() % 1_000_003)  # a program no compilation cache can hold yet
    jax.jit(lambda x: x * salt + 1)(np.arange(5.0)).block_until_ready()
    assert _metric(engine, "jdisagg_compilations_total") == before + 1


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(stop_token_ids=(999,)), "stop_token_ids"),
    ],
)
def test_bad_sampling_params_raise_value_error(engine, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit([1, 2, 3], params)


def test_bad_prompts_raise_value_error(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.submit("")
    with pytest.raises(ValueError, match="context"):
        engine.submit([1] * MAX_CONTEXT)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([1, 256])
    _assert_no_pages(engine)


@pytest.mark.parametrize(
    ("prefill", "decode", "match"),
    [
        ("9x1", "1x1", "need"),
        ("4x1", "2x4", "need"),
        ("3x1", "1x1", "divide"),
        ("banana", "1x1", "mesh spec"),
        ("0x1", "1x1", "tp >= 1"),
    ],
)
def test_impossible_meshes_raise_value_error(checkpoint, prefill, decode, match):
    with pytest.raises(ValueError, match=match):
        _engine(checkpoint, prefill, decode)


@pytest.mark.parametrize("source", ["orbax-directory", "nnx-module"])
def test_engine_serves_an_orbax_checkpoint_and_a_module(checkpoint, reference, tmp_path, source):
    """The two other ways README gives a model: a jdisagg (orbax) checkpoint directory, or a module of one's
    own with its tokenizer. Both must serve the very model the HF checkpoint holds."""
    module = load_hf_model(checkpoint)
    if source == "orbax-directory":
        save_checkpoint(module, tmp_path / "orbax")
        model = tmp_path / "orbax"
    else:
        model = module
        with pytest.raises(ValueError, match="tokenizer"):
            Engine(module, progress=False)
    prompts = _prompts([6, 19], seed=51)
    # The default meshes (1x1 -> 1x1) and test_shutdown_drains_in_flight's sizes: the same programs, so all
    # but the first of the three engines load them from the suite's compile cache.
    with Engine(model, tokenizer=ByteTokenizer(), max_context=MAX_CONTEXT, max_batch=2,
                progress=False) as engine:
        outputs = engine.generate(prompts, SamplingParams(max_tokens=6))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == reference(tuple(prompt), 6)


def test_shutdown_drains_in_flight(checkpoint, reference):
    engine = _engine(checkpoint, "1x1", "1x1", max_batch=2)
    prompt = _prompts([8], seed=41)[0]
    stream = engine.submit(prompt, SamplingParams(max_tokens=6))
    engine.shutdown(drain=True, timeout=120)
    assert stream.result(timeout=1).token_ids == reference(tuple(prompt), 6)
    _assert_no_pages(engine)
