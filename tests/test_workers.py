"""Prefill and decode workers as real processes on 127.0.0.1 (4 virtual CPU devices each).

Outputs must equal the in-process engine's on meshes of the same TP degrees; a SIGKILLed worker must end
its requests with UNAVAILABLE (or let them finish elsewhere) without hangs or reserved pages; a restarted
worker rejoins; a layout the receiver would misread is refused. Partial failures: a worker stalled
(SIGSTOP) past the eviction time is evicted and registers again by itself once it runs; a shorter stall
only delays its streams; health follows whether both roles have a live worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jdisagg.engine import Engine
from jdisagg.meshes import parse_mesh_spec
from jdisagg.metrics import MODEL_LABEL
from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.outputs import FinishReason
from jdisagg.requests import Stage
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.client import make_request
from jdisagg.serving.server import SERVICE_NAME, GenerationServer
from jdisagg.sizes import plan_sizes
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc
from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.v1 import worker_pb2_grpc as wpb_grpc
from jdisagg.workers.front import Front, spawn_workers, stop_workers

SIZES = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=4, max_context=128, num_pages=None)
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nWe are", "To be, or not", "KING HENRY", "Ay"]
GREEDY = SamplingParams(max_tokens=24)
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_k=20, seed=7)


def _ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, DEMO_CONFIG.vocab_size, n).tolist()


# Prompts of 64 tokens sharing their first 48 (three pages): the second one's hand-off is its last 16.
SHARED_PREFIX = _ids(48, seed=11)
PREFIX_PROMPTS = [SHARED_PREFIX + _ids(16, seed=12), SHARED_PREFIX + _ids(16, seed=13)]
TOKEN_KV_BYTES = 2 * DEMO_CONFIG.num_layers * DEMO_CONFIG.num_kv_heads * DEMO_CONFIG.head_dim * 4  # float32


class Cluster:
    """A front with one child process per slot, logs under ``log_dir``.

    One worker of each role starts first; the others start once those have registered, so they load
    every program from the suite's compile cache (the same programs on the same device ids) instead of
    compiling them at the same time on the same cores. Spawning every slot at once (``spawn_workers``, as
    ``launch --processes`` does) is tested below with the launch and the lost hand-off."""

    def __init__(self, prefill: str, decode: str, log_dir: Path, **front_options) -> None:
        self.log_dir = log_dir
        self.front = Front(None, parse_mesh_spec(prefill), parse_mesh_spec(decode), SIZES,
                           pull_timeout_s=20.0, rpc_timeout_s=30.0, **front_options)
        self.children: list[subprocess.Popen] = []
        roles = [slot.role for slot in self.front.slots]
        try:
            for role in dict.fromkeys(roles):
                self.rejoin(role)
            for role in dict.fromkeys(roles):
                self.front.wait_until_registered(role, 1, timeout_s=600.0, children=self.children)
            for role in dict.fromkeys(roles):
                for _ in range(roles.count(role) - 1):
                    self.rejoin(role)
            self.front.wait_until_full(timeout_s=600.0, children=self.children)
        except BaseException:
            self.close()
            raise

    def child(self, role: str, index: int) -> subprocess.Popen:
        """The process serving slot ``index`` of ``role`` (workers take free slots in the order they finish
        compiling, so spawn order says nothing)."""
        pid = getattr(self.front, role)[index].pid
        return next(c for c in self.children if c.pid == pid)

    def rejoin(self, role: str) -> subprocess.Popen:
        """Start a worker by hand, as an operator would on another host; it takes a free slot."""
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        log = open(self.log_dir / f"{role}-{len(self.children)}.log", "w")  # noqa: SIM115 - closed with it
        child = subprocess.Popen(
            [sys.executable, "-m", "jdisagg.cli", "worker", "--role", role, "--join", self.front.address,
             "--devices", "4", "--no-progress", "--exit-with-parent"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.children.append(child)
        return child

    def close(self) -> None:
        self.front.shutdown(drain=False, timeout=5.0)
        stop_workers(self.children)


def _texts(engine: Engine, params: SamplingParams) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


_REFERENCES: dict[tuple[str, str], dict[str, list[list[int]]]] = {}


def _reference(prefill: str, decode: str) -> dict[str, list[list[int]]]:
    """The in-process engine's tokens on meshes of the same TP degrees (computed once per layout)."""
    if (prefill, decode) not in _REFERENCES:
        _REFERENCES[prefill, decode] = _reference_uncached(prefill, decode)
    return _REFERENCES[prefill, decode]


def _reference_uncached(prefill: str, decode: str) -> dict[str, list[list[int]]]:
    """One replica of each role's TP degree: every replica of a role runs the same programs and a request's
    tokens do not depend on what it is batched with (the cluster's own routing differs from run to run),
    so more replicas would only compile the same programs again on other devices. Without the prefix
    cache: the workers' answers, with it, must equal these. TP2 -> TP1 at these sizes is
    test_stop_strings' and test_bench's engine, whose programs a whole-suite run loads from its cache."""
    prefill, decode = (f"{parse_mesh_spec(spec).tp}x1" for spec in (prefill, decode))
    with Engine(prefill_mesh=prefill, decode_mesh=decode, page_size=SIZES.page_size,
                max_batch=SIZES.max_batch, max_context=SIZES.max_context, prefix_cache=False,
                progress=False) as engine:
        return {"greedy": _texts(engine, GREEDY), "sampled": _texts(engine, SAMPLED),
                "prefix": [o.token_ids for o in engine.generate(PREFIX_PROMPTS, GREEDY)]}


def _pages_used(front: Front) -> list[int]:
    return front.engine.stats()["pages_used"]


@pytest.fixture(scope="module")
def tp4_to_tp2(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster("4x1", "2x2", tmp_path_factory.mktemp("tp4_to_tp2"))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def tp2_to_tp1(tmp_path_factory) -> Iterator[Cluster]:
    """Two prefill workers (TP2) and two decode workers (TP1): every role has a survivor."""
    cluster = Cluster("2x2", "1x2", tmp_path_factory.mktemp("tp2_to_tp1"))
    yield cluster
    cluster.close()


def test_tp4_prefill_to_tp2_decode_matches_in_process_engine(tp4_to_tp2):
    want = _reference("4x1", "2x2")
    engine = tp4_to_tp2.front.engine
    assert _texts(engine, GREEDY) == want["greedy"]
    assert _texts(engine, SAMPLED) == want["sampled"]
    assert _pages_used(tp4_to_tp2.front) == [0, 0]
    assert engine.metrics.transfer_bytes._value.get() > 0


def test_tp2_prefill_to_tp1_decode_with_dp2_matches_in_process_engine(tp2_to_tp1):
    want = _reference("2x2", "1x2")
    engine = tp2_to_tp1.front.engine
    assert _texts(engine, GREEDY) == want["greedy"]
    assert _texts(engine, SAMPLED) == want["sampled"]
    assert _pages_used(tp2_to_tp1.front) == [0, 0]


def test_mismatched_fingerprint_is_refused_at_registration(tp2_to_tp1):
    front = tp2_to_tp1.front
    theirs = json.loads(_fingerprint(front))
    theirs["kv_heads"] = 2
    with grpc.insecure_channel(front.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            wpb_grpc.ControlStub(channel).Register(
                wpb.RegisterRequest(role="decode", address="127.0.0.1:1", fingerprint=json.dumps(theirs)),
                timeout=10,
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "kv_heads=2 (front expects 4)" in err.value.details()


def _fingerprint(front: Front) -> str:
    from jdisagg.workers.worker import fingerprint

    return fingerprint(front.config, front.control.kv_dtype, front.settings("decode"))


def test_mismatched_kv_layout_is_refused_never_decoded(tp2_to_tp1):
    """An offer described wrongly is refused by the receiver: before pulling (shape) or after (shards
    listed in another order than sent), with FAILED_PRECONDITION, and the worker keeps serving."""
    front = tp2_to_tp1.front
    with (grpc.insecure_channel(front.prefill[0].address) as p_channel,
          grpc.insecure_channel(front.decode[0].address) as d_channel):
        prefill, decode = wpb_grpc.WorkerStub(p_channel), wpb_grpc.WorkerStub(d_channel)

        def offer() -> wpb.KVOffer:
            request = wpb.PrefillRequest(token_ids=[72, 105], sampling=wpb.SamplingRow(top_p=1.0), forced=-1)
            return prefill.Prefill(request, timeout=30).offer

        good = offer()
        assert good.layout.num_shards == 2  # TP2 prefill: one shard per device
        wrong_shape = wpb.KVOffer()
        wrong_shape.CopyFrom(good)
        wrong_shape.layout.shape[2], wrong_shape.layout.shape[3] = good.layout.shape[3], good.layout.shape[2]
        swapped = offer()
        c = list(swapped.layout.checksums)
        swapped.layout.ClearField("checksums")
        swapped.layout.checksums.extend([c[1], c[0], c[3], c[2]])
        for bad, phrase in ((wrong_shape, "shape"), (swapped, "checksums differ")):
            with pytest.raises(grpc.RpcError) as err:
                decode.Pull(wpb.PullRequest(offer=bad, prompt_tokens=2), timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert phrase in err.value.details()
        staged = decode.Pull(wpb.PullRequest(offer=good, prompt_tokens=2), timeout=30).staged  # still serving
        decode.Discard(staged, timeout=10)
    assert _texts(front.engine, GREEDY) == _reference("2x2", "1x2")["greedy"]


def test_only_the_suffix_a_pull_names_is_accepted(tp2_to_tp1):
    """A prefill worker cuts its offer after ``cached_tokens`` (a multiple of the page size below the
    length, else INVALID_ARGUMENT); a decode worker takes it only for the prompt and cached prefix the pull
    names: the suffix of a 20-token prompt after one page is refused as that prompt's whole KV, a pull
    naming no prompt is refused, and the offer is taken once named right."""
    front = tp2_to_tp1.front
    with (grpc.insecure_channel(front.prefill[0].address) as p_channel,
          grpc.insecure_channel(front.decode[0].address) as d_channel):
        prefill, decode = wpb_grpc.WorkerStub(p_channel), wpb_grpc.WorkerStub(d_channel)
        request = wpb.PrefillRequest(token_ids=_ids(20, seed=5), sampling=wpb.SamplingRow(top_p=1.0),
                                     forced=-1, cached_tokens=5)
        with pytest.raises(grpc.RpcError) as err:
            prefill.Prefill(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cached_tokens=5 must be a multiple of page_size=16" in err.value.details()
        request.cached_tokens = 16
        suffix = prefill.Prefill(request, timeout=30).offer
        assert list(suffix.layout.shape)[1] == 16 and suffix.layout.num_pieces == 1  # 4 tokens, in bucket 16
        for pull, code, phrase in (
            (wpb.PullRequest(offer=suffix, prompt_tokens=20), grpc.StatusCode.FAILED_PRECONDITION,
             "pieces of [16] tokens are not the hand-off of a 20-token prompt after 0 cached tokens"),
            (wpb.PullRequest(offer=suffix), grpc.StatusCode.INVALID_ARGUMENT, "must name the prompt"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                decode.Pull(pull, timeout=30)
            assert err.value.code() == code and phrase in err.value.details(), err.value.details()
        reply = decode.Pull(wpb.PullRequest(offer=suffix, prompt_tokens=20, cached_tokens=16), timeout=30)
        assert reply.bytes == 16 * TOKEN_KV_BYTES
        decode.Discard(reply.staged, timeout=10)


def test_a_long_prompts_suffix_travels_as_chunk_pieces_and_a_shorter_last_one():
    """The hand-off of a 150-token prompt (chunks of 128) after its first page: a 128-token window and the
    16-token bucket of what is left, offered TP2 and pulled TP1 (one process: the transfer server and its
    checks are the same). A pull naming the prompt without its cached page is refused before pulling."""
    import jax
    from jax.sharding import Mesh

    from jdisagg.chunked_prefill import ChunkedKV
    from jdisagg.meshes import TP_AXIS
    from jdisagg.placement import handoff_sharding
    from jdisagg.workers.handoff import ExpectedKV, KVReceiver, KVSender, LayoutMismatchError

    send, receive = (Mesh(np.array(d), (TP_AXIS,)) for d in (jax.devices()[:2], jax.devices()[2:3]))
    shape = DEMO_CONFIG.num_layers, DEMO_CONFIG.num_kv_heads, DEMO_CONFIG.head_dim
    rng = np.random.default_rng(3)
    pieces = [tuple(jax.device_put(rng.normal(size=(shape[0], tokens, *shape[1:])).astype(np.float32),
                                   handoff_sharding(send, shape[1])) for _ in range(2))
              for tokens in (128, 16)]
    sender = KVSender("127.0.0.1", 30.0)  # kept referenced: its transfer server must outlive the pull
    offer = sender.offer(ChunkedKV(tuple(pieces)))
    assert (offer.layout.shape[1], offer.layout.num_pieces, offer.layout.last_piece_tokens) == (128, 2, 16)
    receiver = KVReceiver("127.0.0.1", receive, handoff_sharding(receive, shape[1]),
                          ExpectedKV(*shape, "float32", (16, 32, 64, 128), 256, 16))
    with pytest.raises(LayoutMismatchError, match=r"pieces of \[128, 16\] tokens are not the hand-off of a "
                                                  r"150-token prompt after 0 cached tokens \(pieces of "
                                                  r"\[128, 128\] tokens\)"):
        receiver.pull(offer, 150, 0)
    got = receiver.pull(offer, 150, 16)
    for (k, v), (k_sent, v_sent) in zip(got, pieces, strict=True):
        assert np.array_equal(k, k_sent) and np.array_equal(v, v_sent)


def _cache_counters(engine: Engine) -> dict[str, float]:
    stats = engine.stats()
    return {"hit": stats["hit_tokens"], "handoff": stats["handoff_tokens"],
            "bytes": engine.metrics.transfer_bytes._value.get()}


def test_a_shared_prefix_is_handed_off_between_workers_as_its_suffix_only(tp2_to_tp1):
    """The second of two 64-token prompts sharing three pages goes to the decode worker holding them, which
    is handed off only the last 16 tokens' KV: a quarter of the first prompt's bytes. Both answers are the
    in-process engine's without the cache."""
    engine, want = tp2_to_tp1.front.engine, _reference("2x2", "1x2")["prefix"]
    before = _cache_counters(engine)
    assert engine.generate(PREFIX_PROMPTS[:1], GREEDY)[0].token_ids == want[0]
    first = _cache_counters(engine)
    assert engine.generate(PREFIX_PROMPTS[1:], GREEDY)[0].token_ids == want[1]
    second = _cache_counters(engine)
    assert first["hit"] == before["hit"] and second["hit"] - first["hit"] == 48
    assert second["handoff"] - first["handoff"] == 16
    first_bytes, second_bytes = first["bytes"] - before["bytes"], second["bytes"] - first["bytes"]
    assert (first_bytes, second_bytes) == (64 * TOKEN_KV_BYTES, 16 * TOKEN_KV_BYTES)
    assert _pages_used(tp2_to_tp1.front) == [0, 0]


class Stream:
    """One streaming request over gRPC in a pool thread, counting its own tokens as they arrive."""

    def __init__(self, pool: ThreadPoolExecutor, address: str, prompt: str, max_tokens: int) -> None:
        self.tokens = 0
        self._arrived = threading.Condition()
        self._future = pool.submit(self._run, address, prompt, max_tokens)

    def _run(self, address: str, prompt: str, max_tokens: int) -> str:
        with grpc.insecure_channel(address) as channel:
            try:
                for response in pb_grpc.GenerationStub(channel).Generate(
                    make_request(prompt, max_tokens=max_tokens, ignore_eos=True), timeout=120
                ):
                    with self._arrived:
                        self.tokens += len(response.token_ids)
                        self._arrived.notify_all()
            except grpc.RpcError as exc:
                return exc.code().name
        return "ok"

    def wait_tokens(self, count: int, timeout: float = 120.0) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: self.tokens >= count or self._future.done(), timeout)
        assert self.tokens >= count, f"the stream ended after {self.tokens} tokens: {self.result()}"

    def result(self) -> tuple[str, int]:
        """(outcome, tokens received): "ok" or the status code's name. A stream that hangs raises here."""
        return self._future.result(timeout=120), self.tokens


class Served:
    """A ``GenerationServer`` over a cluster's front, with its health and live-worker metric at hand."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.server = GenerationServer("127.0.0.1", 0, 64)
        self.server.serve(front.engine, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.port}"
        self.pool = ThreadPoolExecutor(16)

    def stream(self, prompt: str, max_tokens: int) -> Stream:
        return Stream(self.pool, self.address, prompt, max_tokens)

    def health(self) -> str:
        """The server's status, the same for the whole server and for jdisagg.v1.Generation.

        The server sets the two names one after the other, so a check that lands between the two sets
        reads both statuses again; they must agree by the next read."""
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(2):
                statuses = {stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                            for name in ("", SERVICE_NAME)}
                if len(statuses) == 1:
                    break
                time.sleep(0.1)
        assert len(statuses) == 1, statuses
        return health_pb2.HealthCheckResponse.ServingStatus.Name(statuses.pop())

    def live_workers(self, role: str) -> float | None:
        metrics = self.front.engine.metrics
        return metrics.registry.get_sample_value(
            "jdisagg_live_workers", {MODEL_LABEL: metrics.model_name, "role": role})

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.server.shutdown(None, 1.0)


def test_sigkilled_decode_worker_ends_its_streams_mid_generation_and_a_restarted_one_rejoins(tp2_to_tp1):
    """The watched stream runs alone first, so the replica holding pages is its replica; a second stream
    goes to the other one. Once the watched stream has its own 8 tokens its worker is killed: it ends
    UNAVAILABLE midway, the other stream finishes."""
    front, served = tp2_to_tp1.front, Served(tp2_to_tp1.front)
    try:
        watched = served.stream("Ay", 125)
        watched.wait_tokens(2)
        (slot,) = [i for i, used in enumerate(_pages_used(front)) if used]
        other = served.stream("Ay", 125)
        other.wait_tokens(2)
        assert all(_pages_used(front))
        watched.wait_tokens(8)
        victim = tp2_to_tp1.child("decode", slot)
        os.kill(victim.pid, signal.SIGKILL)
        code, tokens = watched.result()
        assert code == "UNAVAILABLE" and 8 <= tokens < 125, (code, tokens)  # killed mid-generation
        assert other.result() == ("ok", 125)
        _survive_and_rejoin(tp2_to_tp1, "decode", slot, victim)
    finally:
        served.close()


def test_sigkilled_prefill_worker_mid_prefill_is_retried_on_the_other_and_a_restarted_one_rejoins(
    tp2_to_tp1, caplog
):
    """The victim is stopped first so that the prompts it takes stay in its prefill; killing it then must
    send them to the other prefill worker, and every stream completes.

    The victim's call may hold one prompt or several (prompts are batched per call), and a stall past
    the eviction time (10 s, a loaded machine) evicts it before the kill: either way its prompts are
    retried, so the wait is for every stream to be served or held in a prefill call, not for a count."""
    served = Served(tp2_to_tp1.front)
    engine = tp2_to_tp1.front.engine

    def in_prefill() -> int:
        with engine._cv:
            return sum(r.stage is Stage.PREFILLING for r in engine.scheduler.live.values())

    try:
        victim = tp2_to_tp1.child("prefill", 0)
        os.kill(victim.pid, signal.SIGSTOP)
        streams = [served.stream(PROMPTS[i % len(PROMPTS)], 24) for i in range(6)]
        _wait(lambda: sum(s.tokens > 0 for s in streams) + in_prefill() == len(streams),
              "every prompt is served elsewhere or held by the stopped worker")
        with caplog.at_level("WARNING", logger="jdisagg.engine"):
            os.kill(victim.pid, signal.SIGKILL)
            outcomes = [s.result() for s in streams]
        assert outcomes == [("ok", 24)] * len(streams), outcomes
        assert any("retrying" in r.getMessage() and "prefill worker 0" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        _survive_and_rejoin(tp2_to_tp1, "prefill", 0, victim)
    finally:
        served.close()


def test_a_decode_worker_killed_while_holding_cached_pages_takes_its_cache_with_it(tp2_to_tp1):
    """SIGKILL an idle decode worker whose pages hold cached prefixes: once it is noticed, the front has
    forgotten them (no cached page on its slot, the page invariant holds), so a worker restarted into the
    slot, with empty pools, is never handed just the suffix of a prefix it does not hold; prompts sharing a
    cached prefix get the in-process engine's tokens before and after it rejoins."""
    front, engine = tp2_to_tp1.front, tp2_to_tp1.front.engine
    want = _reference("2x2", "1x2")["prefix"]
    assert [o.token_ids for o in engine.generate(PREFIX_PROMPTS, GREEDY)] == want
    _wait(lambda: engine.stats()["live"] == 0, "every request ended")
    cached = engine.stats()["pages_cached"]
    slot = cached.index(max(cached))
    assert cached[slot] >= 3
    victim = tp2_to_tp1.child("decode", slot)
    os.kill(victim.pid, signal.SIGKILL)
    _wait(lambda: not front.decode[slot].alive, "the dead worker is noticed")
    assert engine.stats()["pages_cached"][slot] == 0
    with engine._cv:
        engine.scheduler.check()
    assert [o.token_ids for o in engine.generate(PREFIX_PROMPTS, GREEDY)] == want  # on the survivor
    _survive_and_rejoin(tp2_to_tp1, "decode", slot, victim)
    assert [o.token_ids for o in engine.generate(PREFIX_PROMPTS, GREEDY)] == want


# Prompts with at most LOCAL_TOKENS uncached tokens are prefilled on their decode worker, LOCAL_BUDGET tokens
# per step: a 15-token prompt takes two chunks, the second starting mid-page.
LOCAL_TOKENS, LOCAL_BUDGET = 16, 8


@pytest.fixture(scope="module")
def local_prefill(tmp_path_factory) -> Iterator[Cluster]:
    """TP2 prefill -> two TP1 decode workers that prefill short prompts themselves. Only the decode
    workers' prefill_local programs are new to the compile cache: the rest are tp2_to_tp1's."""
    cluster = Cluster("2x1", "1x2", tmp_path_factory.mktemp("local_prefill"),
                      local_prefill_tokens=LOCAL_TOKENS, step_token_budget=LOCAL_BUDGET)
    yield cluster
    cluster.close()


def _prefills(after: dict, before: dict) -> tuple[int, int]:
    """(local, remote) prompts scheduled between two ``Engine.stats()``."""
    return (after["local_prefills"] - before["local_prefills"],
            after["remote_prefills"] - before["remote_prefills"])


def test_prompts_prefilled_on_decode_workers_give_the_in_process_engines_tokens(local_prefill):
    """Five of the six prompts have at most 16 tokens: their decode worker prefills them, 8 tokens per Step
    call next to the other rows' decode, and the tokens are the in-process engine's, which prefilled every
    prompt on its prefill mesh (greedy and seeded sampling). Run again, the 21-token prompt finds its first
    page cached and is prefilled locally too. Of two 64-token prompts sharing three pages, the first is
    handed off and the second prefills its last 16 tokens from the first one's pages: nothing handed off."""
    front, want = local_prefill.front, _reference("2x2", "1x2")
    engine = front.engine
    start = engine.stats()
    assert _texts(engine, GREEDY) == want["greedy"]
    greedy = engine.stats()
    assert _texts(engine, SAMPLED) == want["sampled"]
    sampled = engine.stats()
    assert engine.generate(PREFIX_PROMPTS[:1], GREEDY)[0].token_ids == want["prefix"][0]
    first = engine.stats()
    assert engine.generate(PREFIX_PROMPTS[1:], GREEDY)[0].token_ids == want["prefix"][1]
    second = engine.stats()
    assert [_prefills(*pair) for pair in ((greedy, start), (sampled, greedy), (first, sampled),
                                          (second, first))] == [(5, 1), (6, 0), (0, 1), (1, 0)]
    assert second["hit_tokens"] - first["hit_tokens"] == 48
    assert second["handoff_tokens"] == first["handoff_tokens"]
    assert _pages_used(front) == [0, 0]
    with engine._cv:
        engine.scheduler.check()


def _step_with_chunk(address: str, chunk: wpb.LocalChunk) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            wpb_grpc.WorkerStub(channel).Step(wpb.StepRequest(chunks=[chunk]), timeout=30)
    return err.value


def test_local_chunks_a_worker_cannot_run_are_refused_and_local_log_probs_are_the_prefill_workers(
    local_prefill, tp2_to_tp1
):
    """INVALID_ARGUMENT, naming what is wrong: a chunk longer than the worker's local chunk, one that would
    write the scratch page, and any chunk to a worker that compiled no local programs. Both serve on: a
    prompt prefilled on one's decode worker and on the other's prefill worker gets the same tokens,
    log-probabilities and most likely alternatives (which a Step reply carries for its chunks)."""
    row = wpb.SamplingRow(top_p=1.0)
    local, remote_only = (cluster.front.decode[0].address for cluster in (local_prefill, tp2_to_tp1))
    too_long = _step_with_chunk(local, wpb.LocalChunk(token_ids=[5] * 129, pages=range(1, 10), sampling=row))
    scratch = _step_with_chunk(local, wpb.LocalChunk(token_ids=[5] * 4, pages=[0], sampling=row))
    unable = _step_with_chunk(remote_only, wpb.LocalChunk(token_ids=[5] * 4, pages=[1], sampling=row))
    assert {e.code() for e in (too_long, scratch, unable)} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "a local chunk holds 1 to 128 tokens, got 129" in too_long.details()
    assert "page 0 is the scratch page" in scratch.details()
    assert "no local prefill programs" in unable.details()
    params = SamplingParams(max_tokens=GREEDY.max_tokens, logprobs=3)
    before = local_prefill.front.engine.stats()
    here, there = (c.front.engine.generate(PROMPTS[:1], params)[0] for c in (local_prefill, tp2_to_tp1))
    assert _prefills(local_prefill.front.engine.stats(), before) == (1, 0)
    assert here.token_ids == there.token_ids == _reference("2x2", "1x2")["greedy"][0]
    np.testing.assert_allclose(here.logprobs, there.logprobs, atol=1e-4)
    for mine, theirs in zip(here.top_logprobs, there.top_logprobs, strict=True):
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        np.testing.assert_allclose([lp for _, lp in mine], [lp for _, lp in theirs], atol=1e-4)


def test_a_decode_worker_lost_mid_local_prefill_fails_its_prompt_and_frees_its_pages(local_prefill):
    """Both decode workers are stopped, so the Step that carries a local prompt's first chunk cannot be
    answered; the worker it went to is killed: the prompt ends UNAVAILABLE, its pages return and the
    scheduler's invariant holds. The survivor serves, and a restarted worker rejoins and prefills locally."""
    front = local_prefill.front
    engine = front.engine
    workers = [local_prefill.child("decode", i) for i in range(2)]
    before = engine.stats()
    for worker in workers:
        os.kill(worker.pid, signal.SIGSTOP)
    try:
        for worker in workers:
            _wait(lambda pid=worker.pid: _process_state(pid) == "T", "the worker is stopped", timeout=10)
        stream = engine.submit(PROMPTS[1], GREEDY)

        def prefilling_on() -> list[int]:
            with engine._cv:
                return [i for i, held in engine.scheduler.local.items() if held]

        _wait(lambda: prefilling_on(), "the prompt is being prefilled on a decode worker", timeout=20)
        (slot,) = prefilling_on()
        victim = workers[slot]
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        for worker in workers:
            os.kill(worker.pid, signal.SIGCONT)
    output = stream.result(timeout=60)
    assert output.finish_reason == FinishReason.ERROR and output.error_code == "UNAVAILABLE", output
    assert output.token_ids == []  # lost before its first token was sampled
    assert _prefills(engine.stats(), before) == (1, 0)
    _wait(lambda: not front.decode[slot].alive, "the dead worker is noticed")
    with engine._cv:
        engine.scheduler.check()
    _survive_and_rejoin(local_prefill, "decode", slot, victim)
    # Local as well: the survivor's two prompts, and at least five of the six served after the rejoin.
    assert _prefills(engine.stats(), before)[0] >= 1 + 2 + 5


def _survive_and_rejoin(cluster: Cluster, role: str, slot: int, victim: subprocess.Popen) -> None:
    """After ``victim``'s death: its slot is dead, no request or page is left, the survivors serve, and a
    restarted worker takes the slot and serves the in-process reference's tokens."""
    front = cluster.front
    _wait(lambda: not getattr(front, role)[slot].alive, "the dead worker is noticed")
    _wait(lambda: front.engine.stats()["live"] == 0, "every request ended")
    assert _pages_used(front) == [0, 0]

    survivors = front.engine.generate(PROMPTS[:2], GREEDY)  # served by the survivors
    assert all(o.error is None and len(o.token_ids) == 24 for o in survivors)

    cluster.rejoin(role)
    _wait(lambda: getattr(front, role)[slot].alive, "the restarted worker rejoins", timeout=300)
    assert _texts(front.engine, GREEDY) == _reference("2x2", "1x2")["greedy"]
    assert _pages_used(front) == [0, 0]
    assert victim.wait(timeout=10) == -signal.SIGKILL


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_state(pid: int) -> str:
    """``T`` while stopped (field 3 of /proc/N/stat)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    """Child pids of ``pid``, from /proc (field 4 of /proc/N/stat is the parent)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# The launched workers' KV budget per decode device: SIZES.num_pages (33) bfloat16 pages of the demo model
# on one device (a page holds k and v of every layer: 2 x 4 layers x 4 kv heads x 16 tokens x 32 dims x 2
# bytes). In float32 the same budget would hold 16.
LAUNCH_PAGE_BYTES = 2 * DEMO_CONFIG.num_layers * DEMO_CONFIG.num_kv_heads * 16 * DEMO_CONFIG.head_dim * 2
LAUNCH_KV_CACHE_GB = SIZES.num_pages * LAUNCH_PAGE_BYTES / 2**30
LAUNCH_DTYPES = {"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"}


def test_launch_processes_serves_in_the_dtypes_and_kv_budget_given_and_sigterm_stops_its_workers(tmp_path):
    """``--dtype/--kv-cache-dtype/--kv-cache-gb`` and ``--local-prefill-tokens`` reach the spawned workers:
    the pages are what the budget buys in bfloat16, the workers say what they serve in, the 6-token prompt
    is prefilled on the decode worker, and the tokens are the in-process engine's with the same dtypes
    (which prefilled it on its prefill mesh)."""
    from jdisagg.serving.client import wait_until_serving
    from jdisagg.v1 import jdisagg_pb2 as pb

    port, metrics_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(tmp_path / "launch.log", "wb") as log:
        front = subprocess.Popen(
            [sys.executable, "-m", "jdisagg.cli", "launch", "--processes", "--prefill-mesh", "1x1",
             "--decode-mesh", "1x1", "--max-batch", str(SIZES.max_batch), "--max-context",
             str(SIZES.max_context), "--dtype", "bfloat16", "--kv-cache-dtype", "bfloat16", "--kv-cache-gb",
             repr(LAUNCH_KV_CACHE_GB), "--local-prefill-tokens", "8", "--step-token-budget", "8",
             "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", "0", "--no-progress"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        wait_until_serving(f"127.0.0.1:{port}", 600)
        children = _children(front.pid)
        assert len(children) == 2, children  # one prefill and one decode worker
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.GenerationStub(channel).GenerateUnary(
                make_request(PROMPTS[0], max_tokens=GREEDY.max_tokens), timeout=120
            )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        front.send_signal(signal.SIGTERM)
        assert front.wait(timeout=120) == 0, (tmp_path / "launch.log").read_text()[-3000:]
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if front.poll() is None:
            front.kill()
    log_text = (tmp_path / "launch.log").read_text()
    for said in ("prefill worker: params in bfloat16", "local prefill up to 8 uncached tokens",
                 f"decode worker: params in bfloat16, KV pages in bfloat16 ({SIZES.num_pages} with scratch)"):
        assert said in log_text, log_text[-3000:]
    assert f"{LAUNCH_PAGE_BYTES} bytes per page" in log_text
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name in ("jdisagg_kv_pages_total", "jdisagg_local_prefills_total",
                             "jdisagg_remote_prefills_total")}
    assert samples["jdisagg_kv_pages_total"] == SIZES.num_pages - 1  # the scratch page is not handed out
    assert (samples["jdisagg_local_prefills_total"], samples["jdisagg_remote_prefills_total"]) == (1, 0)
    with Engine(prefill_mesh="1x1", decode_mesh="1x1", page_size=SIZES.page_size, max_batch=SIZES.max_batch,
                max_context=SIZES.max_context, kv_cache_gb=LAUNCH_KV_CACHE_GB, prefix_cache=False,
                progress=False, **LAUNCH_DTYPES) as engine:
        assert engine.stats()["pages_total"] == [SIZES.num_pages - 1]
        want = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert list(reply.token_ids) == want
    assert reply.finish_reason == pb.FINISH_REASON_LENGTH


def test_kv_that_never_arrives_fails_its_request_and_frees_its_pages(tmp_path):
    """A prefill worker that drops offered KV before anyone pulls it (here: at once) stands for KV that
    never arrives: the pull's deadline ends the request with UNAVAILABLE, its reserved pages go back, the
    failure is counted, and no request hangs. (Workers in the launch test's dtypes and sizes, so they load
    its programs from the compile cache.)"""
    front = Front(None, parse_mesh_spec("1x1"), parse_mesh_spec("1x1"), SIZES, pull_timeout_s=3.0,
                  rpc_timeout_s=30.0, offer_timeout_s=1e-3, **LAUNCH_DTYPES)
    children = spawn_workers(front, devices_per_worker=1, log_dir=tmp_path)
    try:
        front.wait_until_full(timeout_s=600.0, children=children)
        outputs = front.engine.generate(PROMPTS[:2], GREEDY)
        for output in outputs:
            assert output.finish_reason == FinishReason.ERROR and output.error_code == "UNAVAILABLE", output
            assert "KV hand-off failed" in output.error
            assert len(output.token_ids) <= 1  # at most the first token, which prefill produced
        assert _pages_used(front) == [0]
        assert front.engine.metrics.transfer_failures._value.get() == 2
        assert all(slot.alive for slot in front.slots)  # a lost hand-off is not a lost worker
    finally:
        front.shutdown(drain=False, timeout=5.0)
        stop_workers(children)


STALL_S = 12.0  # longer than the front's eviction time (10 s)


def _stall(process: subprocess.Popen, seconds: float, during=lambda: None) -> None:
    """SIGSTOP ``process`` for ``seconds``, running ``during()`` meanwhile; SIGCONT whatever happens."""
    stopped = time.monotonic()
    os.kill(process.pid, signal.SIGSTOP)
    try:
        during()
        time.sleep(max(0.0, stopped + seconds - time.monotonic()))
    finally:
        os.kill(process.pid, signal.SIGCONT)


def _evicted_but_running(slot, process: subprocess.Popen) -> None:
    """A silent worker is declared dead after its missed heartbeats (10-12 s), well before any call's
    deadline (30 s here) could, though its process lives on."""
    _wait(lambda: not slot.alive, "the silent worker is evicted", timeout=20)
    assert process.poll() is None


def test_a_stalled_only_prefill_worker_is_evicted_and_registers_again_by_itself(tp4_to_tp2):
    """(a) SIGSTOP the only prefill worker for 12 s: the prompts it and the queue held end UNAVAILABLE,
    streams already decoding finish; after SIGCONT the same process serves again within 30 s."""
    front, served = tp4_to_tp2.front, Served(tp4_to_tp2.front)
    try:
        victim, processes = tp4_to_tp2.child("prefill", 0), [c.pid for c in tp4_to_tp2.children]
        decoding = [served.stream(p, 100) for p in PROMPTS[:3]]
        for stream in decoding:
            stream.wait_tokens(2)
        waiting: list[Stream] = []

        def during() -> None:
            waiting.extend(served.stream(p, 8) for p in PROMPTS[3:5])  # one in its prefill, one queued
            _evicted_but_running(front.prefill[0], victim)
            _wait(lambda: served.health() == "NOT_SERVING", "health reports NOT_SERVING", timeout=5)
            assert served.live_workers("prefill") == 0 and served.live_workers("decode") == 2

        _stall(victim, STALL_S, during)
        _wait(lambda: front.prefill[0].alive, "the stalled worker registers again", timeout=30)
        assert front.prefill[0].pid == victim.pid and [c.pid for c in tp4_to_tp2.children] == processes
        _wait(lambda: served.health() == "SERVING", "health reports SERVING again", timeout=5)
        assert [s.result()[0] for s in decoding] == ["ok"] * 3
        assert [s.result()[0] for s in waiting] == ["UNAVAILABLE"] * 2
        assert _texts(front.engine, GREEDY) == _reference("4x1", "2x2")["greedy"]
        _wait(lambda: front.engine.stats()["live"] == 0, "every request ended")
        assert _pages_used(front) == [0, 0]
    finally:
        served.close()


def _streams_on_both_replicas(served: Served) -> list[Stream]:
    streams = [served.stream(p, 100) for p in PROMPTS]
    for stream in streams:
        stream.wait_tokens(2)
    assert all(_pages_used(served.front))
    return streams


def test_b_a_short_decode_stall_only_delays_a_long_one_evicts_and_the_worker_comes_back(tp4_to_tp2):
    """(b) A 3 s stall of a decode worker evicts nothing and its streams finish; a 12 s stall evicts it
    (its streams end UNAVAILABLE, the other replica's finish, health stays SERVING); after SIGCONT it
    registers again with fresh pools and both replicas run sequences again."""
    front, served = tp4_to_tp2.front, Served(tp4_to_tp2.front)
    try:
        victim = tp4_to_tp2.child("decode", 0)
        streams = _streams_on_both_replicas(served)
        alive: list[bool] = []

        def watch_slot() -> None:
            for _ in range(20):
                alive.append(front.decode[0].alive)
                time.sleep(0.1)

        _stall(victim, 3.0, watch_slot)
        assert all(alive) and front.decode[0].alive
        assert [s.result() for s in streams] == [("ok", 100)] * len(streams)

        streams = _streams_on_both_replicas(served)
        _stall(victim, STALL_S, lambda: (_evicted_but_running(front.decode[0], victim),
                                         _wait(lambda: served.health() == "SERVING", "still SERVING")))
        outcomes = [s.result() for s in streams]
        assert {code for code, _ in outcomes} == {"ok", "UNAVAILABLE"}, outcomes
        _wait(lambda: front.decode[0].alive, "the stalled worker registers again", timeout=30)
        assert front.decode[0].pid == victim.pid
        streams = _streams_on_both_replicas(served)  # the rejoined replica takes sequences again
        assert [s.result() for s in streams] == [("ok", 100)] * len(streams)
        assert _texts(front.engine, GREEDY) == _reference("4x1", "2x2")["greedy"]
        assert _pages_used(front) == [0, 0]
    finally:
        served.close()


def test_c_health_is_not_serving_without_a_prefill_worker_and_serving_when_one_joins(tp4_to_tp2):
    """(c) SIGKILL the only prefill worker: NOT_SERVING within 5 s and requests refused with UNAVAILABLE;
    SERVING again once a new worker has joined."""
    front, served = tp4_to_tp2.front, Served(tp4_to_tp2.front)
    try:
        assert served.health() == "SERVING" and served.live_workers("prefill") == 1
        victim = tp4_to_tp2.child("prefill", 0)
        os.kill(victim.pid, signal.SIGKILL)
        _wait(lambda: served.health() == "NOT_SERVING", "health reports NOT_SERVING", timeout=5)
        assert served.live_workers("prefill") == 0
        assert served.stream("ROMEO:", 4).result() == ("UNAVAILABLE", 0)
        tp4_to_tp2.rejoin("prefill")
        _wait(lambda: served.health() == "SERVING", "health reports SERVING again", timeout=300)
        assert served.live_workers("prefill") == 1
        assert _texts(front.engine, GREEDY) == _reference("4x1", "2x2")["greedy"]
    finally:
        served.close()
