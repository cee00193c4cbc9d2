"""The prefix cache and local prefill as policy: page keys, cached and evictable pages, hits, routing, local
chunks, and shared pages through preemption, abort and failure. No JAX: the scheduler is driven call by call
as the engine's stages would, with made-up tokens."""

from __future__ import annotations

import pytest

from jdisagg.executors import SamplingRow
from jdisagg.kv_manager import KVManager, OutOfPages, PagePool
from jdisagg.outputs import FinishReason, RequestMetrics
from jdisagg.prefix_cache import extend_page_keys
from jdisagg.requests import Request, RequestStream, Stage
from jdisagg.sampling_params import SamplingParams
from jdisagg.scheduler import ChunkPlan, Scheduler, SchedulerConfig, TokenSample

EOS = 2
PAGE = 4
SYSTEM = list(range(100, 112))  # a 3-page shared prefix


def _scheduler(pages=(17,), *, max_batch=4, max_context=64, local=0, chunk=4, budget=8, **config):
    return Scheduler(
        SchedulerConfig(
            PAGE, max_batch, max_context, prefix_cache=True, local_prefill_tokens=local,
            local_chunk=chunk if local else 0, step_token_budget=budget, **config,
        ),
        prefill_replicas=(0,),
        decode_pages=dict(enumerate(pages)),
        eos_token_ids=[EOS],
    )


_ids = iter(range(10**9))


def _request(tokens, *, max_tokens=8) -> Request:
    rid = f"r{next(_ids)}"
    return Request(
        rid, list(tokens), SamplingParams(max_tokens=max_tokens), SamplingRow(0.0, 0, 1.0, 0),
        RequestStream(rid, lambda _: False), RequestMetrics(arrival=0.0),
    )


def _tok(token=7) -> TokenSample:
    return TokenSample(token, -0.5)


def _decode(s: Scheduler, *requests: Request) -> None:
    """Queue ``requests``, prefill them remotely, and insert their KV."""
    for r in requests:
        s.add(r)
    assert s.next_prefill() == list(requests)
    for r in requests:
        assert s.first_token(r, _tok()) and s.kv_arrived(r)
        s.inserted(r)


def _finish(s: Scheduler, r: Request) -> None:
    s.cancel(r, FinishReason.ABORT)
    s.plan_step(r.replica)
    s.check()


def _finishes(s: Scheduler) -> dict[str, FinishReason]:
    return {e.request.id: e.finish for e in s.take_emissions() if e.finish is not None}


# ------------------------------------------------------------------ keys and pages


def test_a_page_key_chains_every_token_before_it():
    a = extend_page_keys([], [1, 2, 3, 4, 5, 6, 7, 8, 9], PAGE)
    b = extend_page_keys([], [0, 2, 3, 4, 5, 6, 7, 8], PAGE)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second page, other first one
    assert extend_page_keys(a[:1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], PAGE) == a  # extends, keeps


def test_a_cached_page_without_holders_is_evictable_not_free_and_counts_as_available():
    pool = PagePool(5)
    a, b = pool.allocate(2), pool.allocate(1)
    pool.cache(a, [b"k0", b"k1"])
    pool.release(reversed(a))
    assert (pool.free, pool.used, pool.cached, pool.index.evictable) == (3, 1, 2, 2)
    pool.check()
    pool.share(a[:1])  # a hit holds an evictable page again
    assert (pool.free, pool.used, pool.index.evictable) == (2, 2, 1)
    pool.release(b)
    pool.check()


def test_allocation_takes_free_pages_first_then_evicts_the_least_recently_released():
    pool = PagePool(5)
    first, second = pool.allocate(1), pool.allocate(1)
    pool.cache(first + second, [b"a", b"b"])
    pool.release(second)
    pool.release(first)  # released last: evicted last
    assert pool.allocate(2) not in (first, second) and pool.evictions == 0
    assert pool.allocate(1) == second and pool.evictions == 1
    assert pool.index.lookup([b"a"]) == first and pool.index.lookup([b"b"]) == []
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    pool.check()


def test_clearing_a_replicas_cache_frees_its_evictable_pages():
    kv = KVManager({0: 5})
    pages = kv.allocate("a", 0, 3)
    kv.cache("a", [b"x", b"y"])
    kv.share("b", 0, pages[:1])
    kv.free("a")
    kv.clear_cache(0)
    kv.check()
    assert kv.lookup(0, [b"x"]) == [] and kv.free_pages(0) == 3
    kv.free("b")
    assert kv.free_pages(0) == 4
    kv.check()


def test_the_invariant_check_catches_a_cached_free_page():
    pool = PagePool(4)
    page = pool.allocate(1)
    pool.cache(page, [b"k"])
    pool._free.append(pool._refs.pop(page[0]) and page[0])  # freed behind the index's back
    with pytest.raises(AssertionError):
        pool.check()


# ------------------------------------------------------------------ hits


def test_a_second_request_reuses_the_cached_pages_of_its_prefix():
    s = _scheduler()
    first = _request(SYSTEM + [1, 2])
    _decode(s, first)
    _finish(s, first)
    second = _request(SYSTEM + [5, 6, 7])
    _decode(s, second)
    assert second.cached_tokens == 12
    assert s.counters.hit_tokens == 12 and s.counters.queried_tokens == 14 + 15
    assert s.counters.handoff_tokens == 14 + 3  # the second hands off only its uncached tokens


def test_shared_pages_are_held_by_both_requests_at_once():
    s = _scheduler()
    first = _request(SYSTEM + [1])
    _decode(s, first)
    second = _request(SYSTEM + [5])
    _decode(s, second)
    assert s.pages_of(second)[:3] == s.pages_of(first)[:3]
    assert s.pages_shared() == [3] and s.pages_cached() == [3]
    s.check()


def test_a_different_first_token_misses():
    s = _scheduler()
    first = _request(SYSTEM)
    _decode(s, first)
    other = _request([0] + SYSTEM[1:] + [9])
    _decode(s, other)
    assert other.cached_tokens == 0 and set(s.pages_of(other)).isdisjoint(s.pages_of(first))


def test_a_fully_cached_prompt_still_computes_its_last_page():
    s = _scheduler()
    first = _request(SYSTEM + [1, 2, 3, 4])
    _decode(s, first)
    _finish(s, first)
    again = _request(SYSTEM + [1, 2, 3, 4])  # 16 tokens, all four pages cached
    _decode(s, again)
    assert again.cached_tokens == 12


def test_output_pages_are_cached_when_a_request_finishes():
    s = _scheduler()
    r = _request(SYSTEM[:6])
    _decode(s, r)
    for token in (40, 41, 42, 43, 44):
        rows = s.plan_step(0).rows
        s.step_done(rows, [_tok(token)])
    _finish(s, r)  # 6 prompt + 6 output tokens: the last one's KV is not written, so two full pages
    turn = _request(SYSTEM[:6] + [7, 40, 41, 42, 43, 44, 50])
    _decode(s, turn)
    assert turn.cached_tokens == 8


def test_an_evicted_prefix_misses_and_counts_an_eviction():
    s = _scheduler(pages=(6,))  # 5 usable pages
    first = _request(SYSTEM + [1])  # 14 tokens: 4 pages, 3 cached at insert
    _decode(s, first)
    _finish(s, first)
    assert s.pages_used() == [0] and s.pages_cached() == [3]
    other = _request(list(range(50, 65)))  # 4 pages: 2 free + 2 evicted, the later cached pages first
    _decode(s, other)
    assert s.evictions() == 2 and s.pages_cached() == [1 + 3]
    _finish(s, other)
    again = _request(SYSTEM + [1])
    _decode(s, again)
    assert again.cached_tokens == 4  # only the first page survived
    s.check()


# ------------------------------------------------------------------ shared pages through every end


def test_preempting_a_sharer_keeps_the_shared_pages_for_the_other():
    s = _scheduler(pages=(9,))
    old, young = _request(SYSTEM + [1], max_tokens=20), _request(SYSTEM + [2], max_tokens=20)
    _decode(s, old)
    _decode(s, young)  # 3 shared + 1 own page each: 5 of 8 used
    shared = s.pages_of(old)[:3]
    preempted = []
    for _ in range(12):
        plan = s.plan_step(0)
        preempted += plan.preempted
        s.check()
        if preempted:
            break
        s.step_done(plan.rows, [_tok()] * len(plan.rows))
    assert preempted == [young] and young.stage is Stage.WAITING
    assert s.pages_of(old)[:3] == shared and all(s.kv.pools[0].refs(p) == 1 for p in shared)


@pytest.mark.parametrize("stage", ["prefilling", "transferring", "ready", "running"])
def test_aborting_a_sharer_in_any_stage_leaves_the_other_its_pages(stage):
    s = _scheduler()
    keep = _request(SYSTEM + [1])
    _decode(s, keep)
    r = _request(SYSTEM + [2])
    s.add(r)
    s.next_prefill()
    if stage != "prefilling":
        assert s.first_token(r, _tok())
    if stage in ("ready", "running"):
        assert s.kv_arrived(r)
        s.inserted(r)
    if stage == "running":
        s.plan_step(0)
    s.cancel(r, FinishReason.ABORT)
    if stage == "prefilling":
        assert not s.first_token(r, _tok())
    elif stage == "transferring":
        assert not s.kv_arrived(r)
    else:
        s.plan_step(0)
    assert _finishes(s) == {r.id: FinishReason.ABORT} and not s.pages_of(r)
    assert s.pages_shared() == [0] and len(s.pages_of(keep)) == 4 and s.pages_used() == [4]
    s.check()


def test_a_failed_replica_fails_requests_bound_for_its_cached_prefix_and_forgets_its_cache():
    s = _scheduler(pages=(17, 17))
    first = _request(SYSTEM + [1])
    _decode(s, first)
    on_way = _request(SYSTEM + [2])
    s.add(on_way)
    s.next_prefill()
    assert on_way.replica == first.replica == 0 and on_way.cached_tokens == 12
    other = _request([0, 1, 2, 3, 4])
    _decode(s, other)
    assert other.replica == 1
    assert s.replica_failed(0, "boom") == [first, on_way]
    assert not s.first_token(on_way, _tok())  # the prefill finishing later changes nothing
    assert s.pages_used() == [0, len(s.pages_of(other))] and s.pages_cached() == [0, 1]
    s.check()


# ------------------------------------------------------------------ routing


def test_routing_prefers_the_replica_holding_the_longest_prefix():
    s = _scheduler(pages=(17, 17))
    first = _request(SYSTEM + [1])
    _decode(s, first)  # on 0, which now has fewer free pages
    second = _request(SYSTEM + [2])
    _decode(s, second)
    assert second.replica == 0 and second.cached_tokens == 12


def test_routing_leaves_the_prefix_for_a_much_roomier_replica():
    s = _scheduler(pages=(17, 17))  # 16 usable pages each
    holder = _request(SYSTEM + [1])
    _decode(s, holder)  # 4 pages on 0
    big = _request(SYSTEM + list(range(20)))  # 33 tokens: 9 pages, 3 of them cached on 0
    _decode(s, big)
    assert big.replica == 0 and s.pages_used() == [10, 0]
    second = _request(SYSTEM + list(range(50, 61)))  # 24 tokens: 6 pages, 3 of them cached on 0
    _decode(s, second)
    # Replica 0 would be left with 6 - 3 = 3 free pages, under half of replica 1's 16 - 6 = 10.
    assert second.replica == 1 and second.cached_tokens == 0


# ------------------------------------------------------------------ local prefill


def test_a_short_uncached_remainder_prefills_locally_in_chunks_under_the_step_budget():
    s = _scheduler(local=8, chunk=4, budget=6)
    first = _request(SYSTEM + [1])
    _decode(s, first)  # 13 uncached tokens: remote
    rows = s.plan_step(0).rows
    assert rows == [first] and s.counters.remote_prefills == 1
    s.step_done(rows, [_tok()])
    a, b = _request(SYSTEM + [2, 3, 4, 5, 6, 7]), _request(SYSTEM + [8])  # 6 and 1 uncached tokens
    s.add(a)
    s.add(b)
    assert s.next_prefill() == []  # both go local
    assert a.stage is b.stage is Stage.PREFILLING_LOCAL and s.counters.local_prefills == 2
    plan = s.plan_step(0)
    assert plan.rows == [first]
    assert plan.chunks == [ChunkPlan(a, 12, 16), ChunkPlan(b, 12, 13)]  # 4 (chunk) + 1 <= 6 (budget)
    s.step_done(plan.rows, [_tok()])
    for chunk in plan.chunks:
        s.chunk_done(chunk.request, chunk.end, _tok(33))
    assert b.stage is Stage.READY and b.output_ids == [33] and a.prefilled == 16
    plan = s.plan_step(0)
    assert plan.rows == [first, b] and plan.chunks == [ChunkPlan(a, 16, 18)]
    s.chunk_done(a, 18, _tok(34))
    assert a.stage is Stage.READY and a.output_ids == [34]
    assert s.counters.handoff_tokens == 13  # only the remote prompt's KV was handed off
    s.check()


def test_a_step_runs_ahead_while_local_chunks_are_pending_and_carries_the_next_chunks():
    s = _scheduler(local=8, chunk=4, budget=6)
    first = _request(SYSTEM + [1])
    _decode(s, first)
    rows = s.plan_step(0).rows
    a = _request(SYSTEM + [2, 3, 4, 5, 6, 7])  # 6 uncached tokens: local, in chunks of 4
    s.add(a)
    assert s.next_prefill() == []
    ahead = s.plan_ahead(0, rows)  # behind the step in flight: same rows, and a's first chunk
    assert ahead.rows == [first] and ahead.chunks == [ChunkPlan(a, 12, 16)]
    s.step_done(rows, [_tok()])
    s.chunk_done(a, 16, _tok(33))
    again = s.plan_ahead(0, ahead.rows)
    assert again.rows == [first] and again.chunks == [ChunkPlan(a, 16, 18)]
    s.step_done(ahead.rows, [_tok()])
    s.chunk_done(a, 18, _tok(34))
    assert a.stage is Stage.READY and a.output_ids == [34]
    assert s.plan_ahead(0, again.rows) is None  # a joins the batch: the rows change, the step waits
    s.check()


def test_a_local_prefills_written_pages_are_cached_and_hit():
    s = _scheduler(local=64, chunk=8, budget=8)
    r = _request(SYSTEM + [1, 2, 3, 4, 5])  # 17 tokens, all local
    s.add(r)
    assert s.next_prefill() == []
    while r.stage is Stage.PREFILLING_LOCAL:
        for chunk in s.plan_step(0).chunks:
            s.chunk_done(chunk.request, chunk.end, _tok())
    assert s.pages_cached() == [4]
    twin = _request(SYSTEM + [1, 2, 3, 4, 9])
    s.add(twin)
    s.next_prefill()
    assert twin.cached_tokens == 16 and s.plan_step(0).chunks[-1] == ChunkPlan(twin, 16, 17)


@pytest.mark.parametrize("how", ["abort", "preempt", "fail", "first token ends it"])
def test_a_local_prefill_ends_or_yields_freeing_exactly_its_own_pages(how):
    s = _scheduler(pages=(9,), local=12, chunk=4, budget=4)
    keep = _request(SYSTEM + [1], max_tokens=20)
    _decode(s, keep)  # 13 uncached tokens, prefilled remotely: 4 pages, 3 cached
    shared = s.pages_of(keep)[:3]
    r = _request(SYSTEM + [2, 3, 4, 5, 6, 7, 8, 9])  # 20 tokens: 3 shared + 3 own pages, 8 local tokens
    s.add(r)
    assert s.next_prefill() == [] and s.pages_of(r)[:3] == shared
    plan = s.plan_step(0)
    s.step_done(plan.rows, [_tok()])
    s.chunk_done(r, 16, _tok())
    if how == "abort":
        s.cancel(r, FinishReason.ABORT)
        assert s.plan_step(0).chunks == []
    elif how == "preempt":
        for _ in range(8):  # keep grows until it needs the local prefill's pages
            plan = s.plan_step(0)
            if plan.preempted:
                break
            s.step_done(plan.rows, [_tok()])
        assert plan.preempted == [r] and s.waiting[0] is r and r.stage is Stage.WAITING
    elif how == "fail":
        assert s.replica_failed(0, "boom") == [keep, r]
    else:
        chunk = s.plan_step(0).chunks[0]
        s.chunk_done(r, chunk.end, _tok(EOS))
        assert _finishes(s)[r.id] is FinishReason.STOP
    assert not s.pages_of(r) and s.kv.pools[0].shared == 0
    if how != "fail":
        assert s.pages_of(keep)[:3] == shared
    s.check()


def test_without_a_local_chunk_size_nothing_prefills_locally():
    s = Scheduler(
        SchedulerConfig(PAGE, 4, 64, prefix_cache=True, local_prefill_tokens=64, local_chunk=0),
        prefill_replicas=(0,), decode_pages={0: 17},
    )
    r = _request([1, 2, 3])
    s.add(r)
    assert s.next_prefill() == [r]


def test_a_zero_step_budget_is_refused_when_prefilling_locally():
    with pytest.raises(ValueError, match="step_token_budget"):
        _scheduler(local=8, budget=0)
