"""Batched prefill: ``PrefillReplica.run_batch`` gives every prompt what ``run`` gives it alone.

One TP2 prefill replica of the demo model with prompts of up to 32 tokens and batches of 4 (7 programs:
prefill[16], prefill[32], prefill[4, 16], prefill[4, 32], sample[1], sample[4], sample_rows[4]), so a
mixed list exercises full and padded batched calls and a prompt on its own.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from jdisagg.buckets import plan_prefill_calls
from jdisagg.compile_counter import cache_hit_count, compile_count
from jdisagg.executors import PromptInput, SamplingRow
from jdisagg.meshes import build_layout
from jdisagg.models.demo import DEMO_CONFIG, load_demo_model
from jdisagg.replicas import build_prefill_replica
from jdisagg.sizes import plan_sizes

BATCH = 4
LENGTHS = [31, 3, 30, 12, 25, 20, 17, 16, 14, 9, 5, 2]  # buckets 16 and 32
ROWS = [
    SamplingRow(0.0, 0, 1.0, 0),  # greedy
    SamplingRow(0.8, 0, 1.0, 7),  # temperature
    SamplingRow(1.0, 0, 0.9, 11),  # top-p
    SamplingRow(0.7, 5, 1.0, 3, num_top=3),  # top-k, with alternatives
    SamplingRow(0.0, 0, 1.0, 0, num_top=5),  # greedy, with alternatives
]


@pytest.fixture(scope="module")
def replica():
    sizes = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=2, max_context=32, num_pages=None)
    sizes = dataclasses.replace(sizes, max_prefill_batch=BATCH)
    assert sizes.batched_prefill_buckets == (16, 32)
    graphdef, state = nnx.split(load_demo_model())
    mesh = build_layout("2x1", "1x1").prefill.replicas[0]
    prefill = build_prefill_replica(0, mesh, graphdef, state, sizes)
    for _, compile_program in prefill.compile_tasks():
        compile_program()
    return prefill


def _prompts() -> list[PromptInput]:
    rng = np.random.default_rng(0)
    prompts = [
        PromptInput(rng.integers(1, 256, n).tolist(), ROWS[i % len(ROWS)]) for i, n in enumerate(LENGTHS)
    ]
    prompts[2] = dataclasses.replace(prompts[2], forced=42)  # scoring a given continuation
    return prompts


def _host(result):
    sampled, (k, v) = result
    return [np.asarray(x) for x in sampled], (np.asarray(k), np.asarray(v)), (k.sharding, v.sharding)


def test_run_batch_equals_one_at_a_time(replica):
    prompts = _prompts()
    calls = plan_prefill_calls(LENGTHS, replica.buckets, replica.batched_buckets, BATCH)
    assert sorted(len(c) for c in calls) == [1, 3, 4, 4]  # three batched calls (one padded), one alone

    before = compile_count(), cache_hit_count()  # the suite's compile cache: a load is no compile
    batched = [_host(r) for r in replica.run_batch(prompts)]
    alone = [_host(replica.run(p.token_ids, p.sampling, p.forced)) for p in prompts]
    assert (compile_count(), cache_hit_count()) == before  # every shape was compiled at start-up

    for n, p, (b_sampled, b_kv, b_sharding), (a_sampled, a_kv, a_sharding) in zip(
        LENGTHS, prompts, batched, alone, strict=True
    ):
        tokens, logprobs, top_ids, top_logprobs = b_sampled
        assert tokens.shape == (1,) and top_ids.shape == a_sampled[2].shape
        assert tokens[0] == a_sampled[0][0], f"prompt of {n} tokens"
        np.testing.assert_allclose(logprobs, a_sampled[1], rtol=1e-5, atol=1e-5)
        if p.sampling.num_top:
            np.testing.assert_array_equal(top_ids, a_sampled[2])
            np.testing.assert_allclose(top_logprobs, a_sampled[3], rtol=1e-5, atol=1e-5)
        assert b_sharding == a_sharding
        for got, want in zip(b_kv, a_kv, strict=True):
            assert got.shape == want.shape == (DEMO_CONFIG.num_layers, 16 if n <= 16 else 32, 4, 32)
            np.testing.assert_allclose(got[:, :n], want[:, :n], rtol=1e-5, atol=1e-5)
    assert batched[2][0][0][0] == 42


def test_compile_count_flat_over_compositions(replica):
    prompts = _prompts()
    before = compile_count(), cache_hit_count()
    for group in ([], prompts[:1], prompts[:3], prompts[5:], prompts * 2, [prompts[1]] * 9):
        results = replica.run_batch(group)
        assert len(results) == len(group)
        for sampled, (k, _) in results:
            assert np.asarray(sampled.tokens).shape == (1,) and k.shape[0] == DEMO_CONFIG.num_layers
    assert (compile_count(), cache_hit_count()) == before


def test_plan_groups_by_bucket_within_twice_the_work():
    buckets, batched = (16, 32, 64, 128), (16, 32, 64)
    # sixteen equal prompts: two full calls
    assert plan_prefill_calls([64] * 16, buckets, batched, 8) == [list(range(8)), list(range(8, 16))]
    # a long prompt does not drag short ones up to its bucket: it runs alone, they share a call
    assert plan_prefill_calls([60] + [10] * 7, buckets, batched, 8) == [[0], list(range(1, 8))]
    # a call at least half full is padded; a sparser one runs prompt by prompt
    assert plan_prefill_calls([30] * 4, buckets, batched, 8) == [[0, 1, 2, 3]]
    assert plan_prefill_calls([30] * 3, buckets, batched, 8) == [[0], [1], [2]]
    # prompts share calls with their own bucket only, so each hand-off keeps its own length
    assert plan_prefill_calls([20, 40, 20, 40, 20, 40, 20, 40], buckets, batched, 8) == [[1, 3, 5, 7],
                                                                                          [0, 2, 4, 6]]
    # no batched program for the bucket (over the token budget) or longer than every bucket: alone
    assert plan_prefill_calls([100, 100], buckets, batched, 8) == [[0], [1]]
    assert plan_prefill_calls([500, 5, 5], buckets, batched, 2) == [[0], [1, 2]]
    # batching off
    assert plan_prefill_calls([5, 5, 5], buckets, (), 1) == [[0], [1], [2]]
    assert plan_prefill_calls([], buckets, batched, 8) == []


def test_batched_buckets_follow_the_token_budget():
    sizes = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=2, max_context=512, num_pages=None)
    assert sizes.batched_prefill_buckets == tuple(t for t in sizes.prefill_buckets if t <= 256)
    assert dataclasses.replace(sizes, prefill_token_budget=256).batched_prefill_buckets == (16, 32)
    assert dataclasses.replace(sizes, max_prefill_batch=1).batched_prefill_buckets == ()
