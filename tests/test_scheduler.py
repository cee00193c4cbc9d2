"""The scheduling policy on its own: no JAX, no devices, no threads — each test drives ``Scheduler`` call by
call as the engine's stages would, with the executors' results made up (tokens, failures)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.executors import SamplingRow
from jdisagg.kv_manager import KVManager, OutOfPages, PagePool
from jdisagg.output_processor import OutputProcessor
from jdisagg.outputs import FinishReason, RequestMetrics
from jdisagg.requests import Request, RequestStream, Stage
from jdisagg.sampling_params import SamplingParams
from jdisagg.scheduler import Scheduler, SchedulerConfig, TokenSample
from jdisagg.tokenizer import ByteTokenizer

EOS = 2
PAGE = 4


def _scheduler(pages=(9,), *, max_batch=4, max_context=64, alive=None, prefill=(0,), **config) -> Scheduler:
    return Scheduler(
        SchedulerConfig(PAGE, max_batch, max_context, **config),
        prefill_replicas=prefill,
        decode_pages=dict(enumerate(pages)),
        eos_token_ids=[EOS],
        alive=alive or (lambda role, index: True),
    )


_ids = iter(range(10**9))


def _request(prompt_len=5, *, max_tokens=8, rid=None, forced=(), tokens=None, **params) -> Request:
    rid = rid or f"r{next(_ids)}"
    return Request(
        rid,
        list(range(10, 10 + prompt_len)) if tokens is None else tokens,
        SamplingParams(max_tokens=max_tokens, **params),
        SamplingRow(0.0, 0, 1.0, 0),
        RequestStream(rid, lambda _: False),
        RequestMetrics(arrival=0.0),
        forced_ids=list(forced),
    )


def _tok(token=7) -> TokenSample:
    return TokenSample(token, -0.5)


def _to_decode(s: Scheduler, request: Request, token=7) -> None:
    """Take ``request`` (already prefilling) through its first token, the hand-off and the insert."""
    assert s.first_token(request, _tok(token))
    assert s.kv_arrived(request)
    s.inserted(request)


def _running(s: Scheduler, *requests: Request) -> None:
    for r in requests:
        s.add(r)
    assert s.next_prefill() == list(requests)
    for r in requests:
        _to_decode(s, r)


def _finishes(s: Scheduler) -> dict[str, FinishReason]:
    return {e.request.id: e.finish for e in s.take_emissions() if e.finish is not None}


def test_importing_the_scheduler_loads_no_jax():
    code = "import sys, jdisagg.scheduler, jdisagg.output_processor; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ admission


def test_admission_is_first_come_first_served():
    s = _scheduler()
    reqs = [_request(3) for _ in range(3)]
    for r in reqs:
        s.add(r)
    assert s.next_prefill() == reqs
    assert all(r.stage is Stage.PREFILLING for r in reqs)


def test_a_request_that_does_not_fit_is_not_overtaken():
    s = _scheduler(pages=(5,))  # 4 usable pages = 16 tokens
    big, small = _request(14), _request(2)
    s.add(_request(9))  # 3 pages
    assert len(s.next_prefill()) == 1
    s.add(big)
    s.add(small)
    assert s.next_prefill() == []  # big needs 4 pages, 1 free; small would fit but waits its turn
    assert list(s.waiting) == [big, small]


def test_a_prefill_call_holds_at_most_max_prefill_batch_prompts():
    s = _scheduler(pages=(99,), max_prefill_batch=3)
    reqs = [_request(2) for _ in range(5)]
    for r in reqs:
        s.add(r)
    assert s.next_prefill() == reqs[:3]
    assert s.next_prefill() == reqs[3:]


def test_add_many_queues_in_order_until_the_queue_is_full_and_raises_only_when_none_fits():
    s = _scheduler(pages=(99,), max_queue=3)
    reqs = [_request(2) for _ in range(5)]
    assert s.add_many(reqs) == 3
    assert list(s.waiting) == reqs[:3]
    with pytest.raises(QueueFullError):
        s.add_many(reqs[3:])
    assert s.next_prefill() == reqs[:3]  # queued in one decision: one prefill call takes them together
    assert s.add_many(reqs[3:]) == 2 and list(s.waiting) == reqs[3:]


def test_a_prefill_call_stays_under_the_token_budget_and_a_long_prompt_runs_alone():
    s = _scheduler(pages=(99,), prefill_token_budget=10)
    long, a, b, c = _request(30), _request(4), _request(4), _request(4)
    for r in (long, a, b, c):
        s.add(r)
    assert s.next_prefill() == [long]
    assert s.next_prefill() == [a, b]
    assert s.next_prefill() == [c]


def test_prefill_reserves_pages_for_the_prompt_and_its_first_token():
    s = _scheduler()
    r = _request(8)  # 8 + 1 tokens -> 3 pages of 4
    s.add(r)
    s.next_prefill()
    assert len(s.pages_of(r)) == 3 and s.pages_used() == [3]


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("full", QueueFullError),
        ("duplicate", ValueError),
        ("closed", EngineClosedError),
        ("no workers", WorkerUnavailableError),
    ],
)
def test_add_refuses_with_the_reason(setup, error):
    s = _scheduler(max_queue=1, alive=(lambda role, i: setup != "no workers"))
    if setup in ("full", "duplicate"):
        s.add(_request(rid="x"))
    if setup == "closed":
        s.accepting = False
    with pytest.raises(error):
        s.add(_request(rid="x" if setup == "duplicate" else None))


def test_an_id_can_be_used_again_once_its_output_is_retired():
    s = _scheduler()
    first = _request(rid="same")
    s.add(first)
    s.cancel(first, FinishReason.ABORT)
    with pytest.raises(ValueError, match="already in flight"):
        s.add(_request(rid="same"))
    s.retire(first)
    s.add(_request(rid="same"))


# ------------------------------------------------------------------ routing


def test_routing_picks_the_replica_with_the_most_free_pages():
    s = _scheduler(pages=(9, 9))
    a, b, c = _request(8), _request(2), _request(2)
    s.add(a)
    s.next_prefill()
    s.add(b)
    s.next_prefill()
    s.add(c)
    s.next_prefill()
    assert (a.replica, b.replica, c.replica) == (0, 1, 1)  # ties go to the lower index


def test_routing_skips_a_dead_decode_replica():
    s = _scheduler(pages=(9, 5), alive=lambda role, i: not (role == "decode" and i == 0))
    r = _request(2)
    s.add(r)
    s.next_prefill()
    assert r.replica == 1


def test_no_live_decode_replica_fails_the_waiting_requests_unavailable():
    up = {"decode": True}
    s = _scheduler(alive=lambda role, i: up.get(role, True))
    r = _request()
    s.add(r)
    up["decode"] = False
    assert s.next_prefill() == []
    assert _finishes(s) == {r.id: FinishReason.ERROR} and r.error_code == "UNAVAILABLE"


# ------------------------------------------------------------------ decode


def test_ready_sequences_fill_free_batch_slots_in_order():
    s = _scheduler(pages=(99,), max_batch=2)
    reqs = [_request(2) for _ in range(3)]
    _running(s, *reqs)
    assert s.plan_step(0).rows == reqs[:2]
    assert reqs[2].stage is Stage.READY


def test_a_sequence_grows_a_page_when_its_next_token_crosses_a_boundary():
    s = _scheduler()
    r = _request(6)  # 6 + 1 tokens: 2 pages hold positions 0..7
    _running(s, r)
    assert s.plan_step(0).rows == [r] and len(s.pages_of(r)) == 2  # writes position 6
    s.step_done([r], [_tok()])
    assert len(s.pages_of(r)) == 2  # position 7 still fits
    s.plan_step(0)
    s.step_done([r], [_tok()])
    s.plan_step(0)  # writes position 8: a third page
    assert len(s.pages_of(r)) == 3 and s.pages_used() == [3]


def test_out_of_pages_preempts_the_youngest_and_queues_it_first():
    s = _scheduler(pages=(5,))  # 4 usable pages
    old, young = _request(3), _request(3)  # 1 page each (3 + 1 tokens)
    _running(s, old, young)
    s.plan_step(0)
    later = _request(2)
    s.add(later)
    for _ in range(10):  # both grow to 2 pages, then old needs a third: young goes
        s.step_done([old, young], [_tok(), _tok()])
        plan = s.plan_step(0)
        if plan.preempted:
            break
    assert plan.preempted == [young] and plan.rows == [old]
    assert list(s.waiting) == [young, later] and young.stage is Stage.WAITING
    assert young.metrics.preemptions == 1 and not s.pages_of(young)
    s.check()


def test_a_preempted_sequence_is_prefilled_again_from_all_its_tokens():
    s = _scheduler(pages=(99,))
    r = _request(3)
    _running(s, r)
    s.plan_step(0)
    s.step_done([r], [_tok(40)])
    s._preempt(r)
    assert s.next_prefill() == [r]
    assert r.all_ids == list(range(10, 13)) + [7, 40]
    assert len(s.pages_of(r)) == 2  # 5 tokens + 1


def test_run_ahead_needs_the_same_rows_and_reserves_the_next_tokens_page():
    s = _scheduler()
    a, b = _request(3), _request(3)
    _running(s, a, b)
    rows = s.plan_step(0).rows
    assert s.plan_ahead(0, rows).rows == rows
    assert len(s.pages_of(a)) == 2  # the step behind writes position 4
    assert s.plan_ahead(0, rows[::-1]) is None


@pytest.mark.parametrize("why", ["forced", "last token", "new row"])
def test_run_ahead_waits_when_the_batch_must_change(why):
    s = _scheduler()
    r = _request(3, forced=[5, 6] if why == "forced" else (), max_tokens=2 if why == "last token" else 8)
    _running(s, r)
    rows = s.plan_step(0).rows
    if why == "new row":
        _running(s, _request(2))
    assert s.plan_ahead(0, rows) is None


def test_step_done_ignores_rows_that_ended_meanwhile():
    s = _scheduler()
    a, b = _request(3), _request(3)
    _running(s, a, b)
    rows = s.plan_step(0).rows
    s.step_done(rows, [_tok(EOS), _tok()])  # a ends
    ahead = rows  # a step dispatched behind the first still computed a
    assert s.step_done(ahead, [_tok(), _tok()]) == 1
    assert len(a.output_ids) == 2 and len(b.output_ids) == 3


# ------------------------------------------------------------------ stop rules


@pytest.mark.parametrize(
    ("params", "token", "reason"),
    [
        ({}, EOS, FinishReason.STOP),
        ({"stop_token_ids": (9,)}, 9, FinishReason.STOP),
        ({"ignore_eos": True}, EOS, None),
        ({"max_tokens": 2}, 7, FinishReason.LENGTH),
    ],
)
def test_stop_rules(params, token, reason):
    s = _scheduler()
    r = _request(3, **params)
    _running(s, r)  # the first token (7) came from prefill
    s.plan_step(0)
    s.step_done([r], [_tok(token)])
    assert _finishes(s).get(r.id) == reason


def test_a_full_context_ends_the_request_by_length():
    s = _scheduler(max_context=8)
    r = _request(6, max_tokens=100)
    _running(s, r)
    s.plan_step(0)
    s.step_done([r], [_tok()])
    assert _finishes(s) == {r.id: FinishReason.LENGTH} and not s.pages_of(r)


def test_a_first_token_that_ends_the_request_frees_its_pages_before_any_transfer():
    s = _scheduler()
    r = _request(3)
    s.add(r)
    s.next_prefill()
    assert not s.first_token(r, _tok(EOS))
    assert _finishes(s) == {r.id: FinishReason.STOP} and s.pages_used() == [0]


def _texts(processor: OutputProcessor, request: Request, pieces: list[bytes], finish_at: int | None = None):
    chunks, stop = [], False
    for i, piece in enumerate(pieces):
        done = processor.process(request, list(piece), FinishReason.LENGTH if i == finish_at else None, None)
        chunks.append(done.chunk.text if done.chunk else "")
        stop = stop or done.stop
    return chunks, stop


def test_stop_strings_across_token_boundaries_are_held_back_and_cut():
    processor = OutputProcessor(ByteTokenizer())
    r = _request(stop=("END",))
    chunks, stop = _texts(processor, r, [b"ab", b"cE", b"N", b"Dxy"])
    # Two characters (a stop string's length - 1) are held back until they cannot start "END".
    assert stop and chunks == ["", "ab", "c", ""]
    final = processor.process(r, [], FinishReason.ABORT, None)  # the stage holding the pages ends it
    assert final.output.text == "abc" and final.output.finish_reason is FinishReason.STOP


def test_text_that_is_not_a_stop_string_is_released_at_the_end():
    processor = OutputProcessor(ByteTokenizer())
    r = _request(stop=("END",))
    chunks, stop = _texts(processor, r, [b"xE", b"N"], finish_at=1)
    assert not stop and "".join(chunks) == "xEN"


# ------------------------------------------------------------------ cancel and failures


def test_abort_while_waiting_ends_at_once():
    s = _scheduler()
    r = _request()
    s.add(r)
    assert s.cancel(r, FinishReason.ABORT)
    assert _finishes(s) == {r.id: FinishReason.ABORT} and not s.waiting
    assert not s.cancel(r, FinishReason.ABORT)


@pytest.mark.parametrize("stage", ["prefilling", "transferring", "ready", "running"])
def test_abort_in_every_stage_frees_the_pages_where_the_next_stage_touches_it(stage):
    s = _scheduler()
    r = _request(5)
    s.add(r)
    s.next_prefill()
    if stage != "prefilling":
        assert s.first_token(r, _tok())
    if stage in ("ready", "running"):
        assert s.kv_arrived(r)
        s.inserted(r)
    if stage == "running":
        s.plan_step(0)
    s.take_emissions()
    assert s.cancel(r, FinishReason.ABORT) and s.pages_used() != [0]  # marked; still held
    if stage == "prefilling":
        assert not s.first_token(r, _tok())
    elif stage == "transferring":
        assert not s.kv_arrived(r)
    else:
        assert s.plan_step(0).rows == []
    assert _finishes(s) == {r.id: FinishReason.ABORT} and s.pages_used() == [0]
    s.check()


def test_a_replica_failing_mid_step_frees_exactly_its_pages():
    s = _scheduler(pages=(9, 9))
    a, b = _request(3), _request(3)
    _running(s, a, b)
    assert (a.replica, b.replica) == (0, 1)
    s.plan_step(0)
    s.plan_step(1)
    before = s.pages_of(b)
    assert s.replica_failed(0, "boom") == [a]
    assert s.pages_used() == [0, len(before)] and s.pages_of(b) == before
    assert _finishes(s) == {a.id: FinishReason.ERROR}
    s.check()


def test_a_worker_lost_during_the_transfer_fails_the_request_unavailable():
    s = _scheduler()
    r = _request()
    s.add(r)
    s.next_prefill()
    assert s.first_token(r, _tok())
    s.fail(r, "decode worker 0 was lost during Pull", "UNAVAILABLE")
    assert _finishes(s) == {r.id: FinishReason.ERROR}
    assert r.error_code == "UNAVAILABLE" and s.pages_used() == [0]


def test_a_lost_prefill_worker_requeues_its_prompts_in_order_when_another_is_alive():
    up = {0: True, 1: True}
    s = _scheduler(prefill=(0, 1), alive=lambda role, i: role == "decode" or up[i], max_prefill_batch=2)
    a, b, c = _request(), _request(), _request()
    for r in (a, b, c):
        s.add(r)
    jobs = s.next_prefill()
    up[0] = False
    s.prefill_lost(jobs, "prefill worker 0 lost")
    assert list(s.waiting) == [a, b, c] and s.pages_used() == [0]
    up[1] = False
    assert s.next_prefill() == []  # no prefill worker is left: everything waiting fails
    assert _finishes(s) == dict.fromkeys((a.id, b.id, c.id), FinishReason.ERROR)


# ------------------------------------------------------------------ pages


def test_shared_pages_return_only_when_their_last_holder_lets_go():
    kv = KVManager({0: 5})
    pages = kv.allocate("a", 0, 2)
    kv.share("b", 0, pages)
    kv.check()
    assert kv.free("a") == 2 and kv.free_pages(0) == 2
    kv.check()
    kv.free("b")
    assert kv.free_pages(0) == 4
    with pytest.raises(AssertionError, match="twice"):
        kv.pools[0].release(pages)


def test_a_pool_never_hands_out_the_scratch_page_or_a_partial_allocation():
    pool = PagePool(4)
    with pytest.raises(OutOfPages):
        pool.allocate(4)
    assert sorted(pool.allocate(3)) == [1, 2, 3] and pool.free == 0


PREFIXES = (list(range(100, 112)), list(range(100, 108)) + [9] * 4, list(range(200, 206)))


def _shared_prompt(rng: random.Random, turns: list[list[int]]) -> list[int]:
    """A next turn (a recently finished request's tokens and a new message), or a prompt that starts with
    some of one of a few common prefixes."""
    message = [rng.randint(3, 20) for _ in range(rng.randint(1, 6))]
    if turns and rng.random() < 0.5:
        return rng.choice(turns[-4:])[:24] + message
    prefix = rng.choice(PREFIXES)
    return prefix[: rng.randint(0, len(prefix))] + message


class _Pools:
    """What the decode replicas' pages hold, as the engine's programs would write it: (replica, page) ->
    {slot: token}. A request must find its own tokens in every page slot it counts as written."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], dict[int, int]] = {}

    def write(self, replica: int, pages: list[int], position: int, token: int) -> None:
        self.slots.setdefault((replica, pages[position // PAGE]), {})[position % PAGE] = token

    def write_tokens(self, s: Scheduler, request: Request, start: int, end: int) -> None:
        for position in range(start, end):
            self.write(request.replica, s.pages_of(request), position, request.all_ids[position])

    def reset(self, replica: int) -> None:
        self.slots = {key: v for key, v in self.slots.items() if key[0] != replica}

    def check(self, s: Scheduler) -> None:
        for r in s.live.values():
            if r.stage in (Stage.PREFILLING, Stage.TRANSFERRING):
                written = r.cached_tokens
            elif r.stage is Stage.PREFILLING_LOCAL:
                written = r.prefilled
            elif r.stage in (Stage.READY, Stage.RUNNING):
                written = len(r.all_ids) - 1
            else:
                continue
            pages = s.pages_of(r)
            for position in range(written):
                held = self.slots.get((r.replica, pages[position // PAGE]), {}).get(position % PAGE)
                assert held == r.all_ids[position], f"{r.id} position {position}: {held}"


@pytest.mark.parametrize("cache", [False, True], ids=["plain", "prefix-cache-and-local-prefill"])
@pytest.mark.parametrize("seed", range(4))
def test_random_event_sequences_keep_the_pages_exactly_the_live_requests(seed, cache):
    """Drive the scheduler with random arrivals (prompts drawn from a few common prefixes), tokens, local
    chunks, aborts, preemptions, failures and lost workers; after every event the used pages are exactly
    what the live requests hold, nothing freed twice, every page free, evictable or held, and every token
    a request counts as written is in its pages as the programs wrote it (so a cached page never serves
    another prefix's KV, and a shared page is never written)."""
    rng = random.Random(seed)
    up = {("decode", 0): True, ("decode", 1): True, ("prefill", 0): True}
    config = {"prefix_cache": True, "local_prefill_tokens": 6, "local_chunk": 4, "step_token_budget": 6}
    s = _scheduler(pages=(16, 12) if cache else (10, 8), max_batch=3, max_context=40,
                   alive=lambda role, i: up[role, i], **(config if cache else {}))
    pools = _Pools()
    transferring: list = []
    arrived: list = []
    inflight: dict[int, list] = {0: [], 1: []}
    turns: list[list[int]] = []
    for _ in range(1500):
        event = rng.choices(
            ["add", "prefill", "transfer", "insert", "step", "cancel", "fail", "lost", "revive", "retire"],
            [4, 2, 2, 2, 8, 1, 0.3, 0.3, 1, 1],
        )[0]
        if event == "add" and len(s.waiting) < 8:
            try:
                s.add(_request(tokens=_shared_prompt(rng, turns), max_tokens=rng.randint(1, 16)))
            except WorkerUnavailableError:
                assert not s.servable()
        elif event == "prefill":
            jobs = s.next_prefill()
            if jobs and rng.random() < 0.1:
                s.prefill_lost(jobs, "lost")
            else:
                for r in jobs:
                    if s.first_token(r, _tok(rng.choice([EOS, 7, 7, 7]))):
                        transferring.append(r)
        elif event == "transfer" and transferring:
            r = transferring.pop(rng.randrange(len(transferring)))
            if rng.random() < 0.1:
                s.fail(r, "pull failed", "UNAVAILABLE")
            else:
                arrived.append(r)
        elif event == "insert" and arrived:
            r = arrived.pop(0)
            if s.kv_arrived(r):  # the decode thread: arrival, insert and its record in one go
                pools.write_tokens(s, r, r.cached_tokens, len(r.all_ids) - 1)
                s.inserted(r)
        elif event == "step":
            replica = rng.randrange(2)
            rows = inflight[replica]
            if rows:
                ahead = s.plan_ahead(replica, rows) if rng.random() < 0.5 else None
                behind = [(r, s.pages_of(r), len(r.all_ids)) for r in ahead.rows] if ahead else []
                for chunk in ahead.chunks if ahead else []:  # queued before the step ahead
                    pools.write_tokens(s, chunk.request, chunk.start, chunk.end)
                s.step_done(rows, [_tok(EOS if rng.random() < 0.03 else 7) for _ in rows])
                for r, pages, position in behind:  # fed on device with the token just read
                    pools.write(replica, pages, position, r.all_ids[position])
                for chunk in ahead.chunks if ahead else []:  # read after the step in flight
                    s.chunk_done(chunk.request, chunk.end, _tok(rng.choice([EOS, 7, 7, 7])))
                inflight[replica] = ahead.rows if ahead else []
            else:
                plan = s.plan_step(replica)
                for r in plan.rows:
                    pools.write_tokens(s, r, len(r.all_ids) - 1, len(r.all_ids))
                for chunk in plan.chunks:
                    pools.write_tokens(s, chunk.request, chunk.start, chunk.end)
                    s.chunk_done(chunk.request, chunk.end, _tok(rng.choice([EOS, 7, 7, 7])))
                inflight[replica] = plan.rows
        elif event == "cancel" and s.live:
            s.cancel(rng.choice(list(s.live.values())), FinishReason.ABORT)
        elif event == "fail":
            replica = rng.randrange(2)
            s.replica_failed(replica, "boom")
            pools.reset(replica)
            inflight[replica] = []
        elif event == "lost":
            up["decode", rng.randrange(2)] = False
        elif event == "revive":
            up["decode", 0] = up["decode", 1] = True
        elif event == "retire":
            for e in s.take_emissions():
                if e.finish is not None:
                    s.retire(e.request)
                    turns.append(e.request.all_ids)
        s.check()
        pools.check(s)
    ended = {r.id for r in s.live.values() if r.stage is Stage.DONE}
    held = {(r.replica, page) for r in s.live.values() if r.id not in ended for page in s.pages_of(r)}
    assert sum(s.pages_used()) == len(held)
    if cache:
        assert s.counters.hit_tokens and s.counters.local_prefills and s.counters.remote_prefills
