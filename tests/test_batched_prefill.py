"""Batched prefill: ``PrefillReplica.run_batch`` gives every prompt what ``run`` gives it alone.

One TP2 prefill replica of the demo model with prompts of up to 32 tokens and batches of 2 and 4 (11
programs: prefill[16], prefill[32], prefill[B, 16] and prefill[B, 32] for B in 2 and 4, sample[1, 2, 4],
sample_rows[2, 4]), so a mixed list exercises full calls of both sizes and a padded one; compositions
exercise prompts on their own.
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
LENGTHS = [31, 3, 30, 12, 25, 20, 17, 16, 14, 9, 5, 2, 28]  # 6 in bucket 32, 7 in bucket 16
ROWS = [
    SamplingRow(0.0, 0, 1.0, 0),  # greedy
    SamplingRow(0.8, 0, 1.0, 7),  # temperature
    SamplingRow(1.0, 0, 0.9, 11),  # top-p
    SamplingRow(0.7, 5, 1.0, 3, num_top=3),  # top-k, with alternatives
    SamplingRow(0.0, 0, 1.0, 0, num_top=5),  # greedy, with alternatives
]


@pytest.fixture(scope="module")
def replica():
    sizes = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=BATCH, max_context=32, num_pages=None)
    assert sizes.batched_prefill == {16: (2, 4), 32: (2, 4)}
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
    calls = plan_prefill_calls(LENGTHS, replica.buckets, replica.batched)
    # bucket 32: a full call of 4 and one of 2; bucket 16: a full call of 4 and 3 prompts padded to 4
    assert sorted((c.rows, len(c.prompts)) for c in calls) == [(2, 2), (4, 3), (4, 4), (4, 4)]

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
    buckets = (16, 32, 64, 128, 256, 512)
    batched = {16: (8, 16), 32: (8, 16), 64: (8, 16), 128: (8, 16), 256: (8,)}

    def plan(lengths, batched=batched):
        return [(c.rows, c.prompts) for c in plan_prefill_calls(lengths, buckets, batched)]

    # equal prompts fill the largest calls; the rest takes the smallest size that holds it
    assert plan([64] * 32) == [(16, list(range(16))), (16, list(range(16, 32)))]
    assert plan([64] * 20) == [(16, list(range(16))), (8, list(range(16, 20)))]
    assert plan([64] * 12) == [(16, list(range(12)))]
    assert plan([64] * 5) == [(8, list(range(5)))]
    # a call at least half full is padded; a sparser one runs prompt by prompt
    assert plan([30] * 4) == [(8, [0, 1, 2, 3])]
    assert plan([30] * 3) == [(1, [0]), (1, [1]), (1, [2])]
    # a long prompt does not drag short ones up to its bucket: it runs alone, they share a call
    assert plan([100] + [10] * 7) == [(1, [0]), (8, list(range(1, 8)))]
    # prompts share calls with their own bucket only, so each hand-off keeps its own length
    assert plan([20, 40] * 4) == [(8, [1, 3, 5, 7]), (8, [0, 2, 4, 6])]
    # a bucket whose 16-prompt call exceeds the token budget has only the smaller size
    assert plan([200] * 10) == [(8, list(range(8))), (1, [8]), (1, [9])]
    # no batched program for the bucket, or longer than every bucket: alone
    assert plan([300, 300]) == [(1, [0]), (1, [1])]
    assert plan([600, 5, 5], {16: (2,)}) == [(1, [0]), (2, [1, 2])]
    # batching off
    assert plan([5, 5, 5], {}) == [(1, [0]), (1, [1]), (1, [2])]
    assert plan([]) == []


def test_batched_shapes_follow_the_token_budget():
    sizes = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=16, max_context=512, num_pages=None)
    assert sizes.max_prefill_batch == 16 and sizes.prefill_batch_sizes == (8, 16)
    assert sizes.batched_prefill == {16: (8, 16), 32: (8, 16), 64: (8, 16), 128: (8, 16), 256: (8,)}
    assert dataclasses.replace(sizes, prefill_token_budget=256).batched_prefill == {16: (8, 16), 32: (8,)}
    assert dataclasses.replace(sizes, max_prefill_batch=3).prefill_batch_sizes == (2, 3)
    assert dataclasses.replace(sizes, max_prefill_batch=2).prefill_batch_sizes == (2,)
    assert dataclasses.replace(sizes, max_prefill_batch=1).batched_prefill == {}
    # a call holds no more prompts than a decode step
    assert dataclasses.replace(sizes, max_batch=8).prefill_batch_sizes == (4, 8)
    assert dataclasses.replace(sizes, max_batch=1).batched_prefill == {}
