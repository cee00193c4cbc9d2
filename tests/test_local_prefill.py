"""The device side of the prefix cache: prefill on the decode replica from its pages, and the suffix-only
hand-off.

A tiny sliding-window model (window 24, so chunks straddle it) with 8-token pages, a 64-token context and a
32-token prefill chunk (so prompts past 32 tokens are chunked on the prefill mesh). One TP1 prefill replica
and two decode replicas, TP2 and TP4 (its pools repeat each of the 2 kv heads twice), each compiled once for
the module. Everything is compared with what
prefill + hand-off + insert give for the same prompt: first tokens, log-probabilities, the KV in the pages,
and greedy continuations.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jdisagg.executors import LocalChunk, PromptInput, SamplingRow
from jdisagg.local_prefill import chunk_lengths
from jdisagg.meshes import TP_AXIS
from jdisagg.models import ModelConfig
from jdisagg.models.chunk_attention import chunk_attention, paged_chunk_attention
from jdisagg.models.loading import init_model
from jdisagg.replicas import build_decode_replica, build_prefill_replica
from jdisagg.sizes import plan_sizes

TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
    tie_word_embeddings=False, attention_bias=False, model_type="mistral", sliding_window=24,
)
PAGE = 8
GREEDY_TOP = SamplingRow(0.0, 0, 1.0, 0, num_top=3)
SEEDED = SamplingRow(0.9, 0, 1.0, 5)
KV_BYTES_PER_TOKEN = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4  # k and v, float32


@pytest.fixture(scope="module")
def replicas():
    sizes = plan_sizes(TINY, page_size=PAGE, max_batch=2, max_context=64, num_pages=None)
    sizes = dataclasses.replace(sizes, prefill_chunk=32, max_prefill_batch=1)
    assert sizes.chunked and sizes.prefill_buckets == (16, 32)
    graphdef, state = nnx.split(init_model(TINY, seed=3))
    devices = jax.devices()
    prefill = build_prefill_replica(0, Mesh(np.array(devices[:1]), (TP_AXIS,)), graphdef, state, sizes)
    decode = {
        name: build_decode_replica(i, Mesh(np.array(devs), (TP_AXIS,)), graphdef, state, sizes, None)
        for i, (name, devs) in enumerate([("tp2", devices[1:3]), ("tp4", devices[3:7])])
    }
    for replica in (prefill, *decode.values()):
        for _, compile_program in replica.compile_tasks():
            compile_program()
    assert decode["tp2"].local_chunk == 32 and chunk_lengths(32) == (16, 32)  # two lengths compiled
    return prefill, decode


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 256, n).tolist()


def _handoff(prefill, decode, prompt: PromptInput, pages: list[int]):
    """Prefill on the prefill mesh, hand off, insert into ``pages``: the first token (host) and bytes."""
    ((sampled, kv),) = prefill.run_batch([prompt])
    staged, nbytes = decode.receive(kv)
    decode.insert(staged, pages)
    return [np.asarray(x) for x in sampled], nbytes


def _kv_in_pages(decode, pages: list[int], start: int, end: int) -> list[np.ndarray]:
    """Every layer's k and v of positions ``start .. end - 1`` of a sequence held in ``pages``."""
    out = []
    for pool in (p for layer in decode.pools for p in layer):
        held = np.asarray(pool)[:, pages]  # [kv_heads, pages, page_size, head_dim]
        out.append(held.reshape(held.shape[0], -1, held.shape[-1])[:, start:end])
    return out


def _assert_same_kv(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def _assert_same_sample(got, want, row: int = 0, num_top: int = 3) -> None:
    """One row of a local prefill's samples equals prefill's first token (token, logprob, and the
    ``num_top`` alternatives the row asked for)."""
    tokens, logprobs, top_ids, top_logprobs = got
    assert tokens[row] == want[0][0]
    np.testing.assert_allclose(logprobs[row], want[1][0], atol=1e-4)
    np.testing.assert_array_equal(top_ids[row, :num_top], want[2][0, :num_top])
    np.testing.assert_allclose(top_logprobs[row, :num_top], want[3][0, :num_top], atol=1e-4)


def test_chunk_lengths_are_the_longest_and_its_halves():
    assert chunk_lengths(256) == (16, 32, 64, 128, 256)
    assert chunk_lengths(32) == (16, 32) and chunk_lengths(24) == (24,) and chunk_lengths(8) == (8,)


@pytest.mark.parametrize("mesh", ["tp2", "tp4"])
@pytest.mark.parametrize("split", [[30], [13, 17], [5, 12, 13]])
def test_local_prefill_in_chunks_equals_prefill_and_insert(replicas, mesh, split):
    """Prompt A (30 tokens) locally in 1, 2 or 3 chunks (a chunk boundary mid-page, the window reaching
    back across chunks), prompt B (27 tokens, seeded sampling, a forced first token) whole beside A's first
    chunk in one call: the same first tokens and log-probabilities as prefill, and the same KV in the pages
    as insert."""
    prefill, decode = replicas
    a, b = _prompt(30, seed=1), _prompt(27, seed=2)
    want_a, _ = _handoff(prefill, decode[mesh], PromptInput(a, GREEDY_TOP), [1, 2, 3, 4])
    want_b, _ = _handoff(prefill, decode[mesh], PromptInput(b, SEEDED, forced=42), [5, 6, 7, 8])
    kv_a = _kv_in_pages(decode[mesh], [1, 2, 3, 4], 0, 30)
    kv_b = _kv_in_pages(decode[mesh], [5, 6, 7, 8], 0, 27)

    pages_a, pages_b = [9, 10, 11, 12], [13, 14, 15, 16]
    start, got = 0, []
    for i, n in enumerate(split):
        chunks = [LocalChunk(a[start : start + n], start, pages_a, GREEDY_TOP)]
        if i == 0:  # B first: a 5- or 13-token chunk of A runs in a call of its own length, after B's
            chunks.insert(0, LocalChunk(b, 0, pages_b, SEEDED, forced=42))
        got.append(decode[mesh].collect(decode[mesh].prefill_local(chunks)))
        start += n
    _assert_same_sample(got[-1], want_a, row=1 if len(split) == 1 else 0)
    _assert_same_sample(got[0], want_b, row=0, num_top=0)
    assert got[0].tokens[0] == 42
    _assert_same_kv(_kv_in_pages(decode[mesh], pages_a, 0, 30), kv_a)
    _assert_same_kv(_kv_in_pages(decode[mesh], pages_b, 0, 27), kv_b)


def _greedy_continuation(decode, first: int, position: int, pages: list[int], steps: int) -> list[int]:
    tokens = [first]
    for step in range(steps):
        sampled = decode.step([tokens[-1]], [position + step], [pages], [GREEDY_TOP], [-1])
        tokens.append(int(sampled.tokens[0]))
    return tokens


def test_cached_prefix_with_a_local_suffix_continues_as_the_full_prefill(replicas):
    """An earlier request filled three pages with the KV of a 24-token prefix; a 45-token prompt starting
    with it prefills only its 21-token suffix on the decode replica, over those pages: the same greedy
    continuation (12 tokens, past the window) as prefilling the whole prompt and inserting it."""
    prefill, decode = replicas
    replica = decode["tp4"]
    prompt = _prompt(45, seed=4)
    full_pages = [1, 2, 3, 4, 5, 6, 7, 8]
    want, _ = _handoff(prefill, replica, PromptInput(prompt, GREEDY_TOP), full_pages)
    expected = _greedy_continuation(replica, int(want[0][0]), 45, full_pages, 12)

    prefix_pages = [9, 10, 11]
    _handoff(prefill, replica, PromptInput(prompt[:24], GREEDY_TOP), prefix_pages)
    pages = prefix_pages + [12, 13, 14, 15, 16]
    got = replica.collect(replica.prefill_local([LocalChunk(prompt[24:], 24, pages, GREEDY_TOP)]))
    _assert_same_sample(got, want)
    assert _greedy_continuation(replica, int(got.tokens[0]), 45, pages, 12) == expected


def test_chained_steps_upload_step_inputs_only_when_a_table_grows(replicas, monkeypatch):
    """Each decode step computes its successor's inputs on device (positions + 1, the same tables), so
    chained steps upload positions and page tables only when a row's table grows by a page, here at
    positions 45, 48 and 56 of 12 steps, and continue exactly as steps that upload every time."""
    import jdisagg.replicas

    prefill, decode = replicas
    replica = decode["tp2"]
    prompt = _prompt(45, seed=6)
    pages = [1, 2, 3, 4, 5, 6, 7, 8]
    first, _ = _handoff(prefill, replica, PromptInput(prompt, GREEDY_TOP), pages)

    def chained(fresh_every_step: bool) -> list[int]:
        step, tokens = [int(first[0][0])], []
        for position in range(45, 57):
            if fresh_every_step:
                replica._next_host_inputs = None  # forget the successor: upload this step's inputs
            step = replica.dispatch(step, [position], [pages[: position // PAGE + 1]], [GREEDY_TOP], [-1])
            tokens.append(int(replica.collect(step).tokens[0]))
        return tokens

    expected = chained(fresh_every_step=True)
    uploads = []
    put = jdisagg.replicas._put
    monkeypatch.setattr(jdisagg.replicas, "_put", lambda mesh, a: uploads.append(a.copy()) or put(mesh, a))
    assert chained(fresh_every_step=False) == expected
    step_inputs = [a for a in uploads if a.ndim == 2 and a.shape[1] > 1]  # [B, 1 + W]; not the token ids
    assert [int(a[0, 0]) for a in step_inputs] == [45, 48, 56]


@pytest.mark.parametrize(("length", "cached", "moved"), [
    (28, 16, 16),  # a short prompt (bucket 32): its 12-token suffix moves as one 16-token piece
    (50, 8, 48),  # a chunked prompt (two 32-token pieces): re-cut at 8 into pieces of 32 and 16 tokens
    (50, 40, 16),  # a chunked prompt whose suffix sits inside its last piece
])
def test_suffix_handoff_moves_only_the_suffix_and_inserts_the_same_kv(replicas, length, cached, moved):
    """TP1 prefill -> TP2 decode. With ``cached_tokens``, the hand-off moves the bucketed suffix only
    (bytes proportional to it), and inserting it into the pages after the shared prefix pages gives the
    KV the full hand-off gives those positions; the first token is the same."""
    prefill, decode = replicas
    replica = decode["tp2"]
    prompt = _prompt(length, seed=length + cached)
    full_pages = [1, 2, 3, 4, 5, 6, 7]
    want, full_bytes = _handoff(prefill, replica, PromptInput(prompt, SEEDED), full_pages)
    want_kv = _kv_in_pages(replica, full_pages, cached, length)

    shared = full_pages[: cached // PAGE]  # the prefix pages the decode replica already holds
    pages = shared + [8, 9, 10, 11, 12, 13, 14][: len(full_pages) - len(shared)]
    got, nbytes = _handoff(prefill, replica, PromptInput(prompt, SEEDED, cached_tokens=cached),
                           pages[cached // PAGE :])
    assert nbytes == moved * KV_BYTES_PER_TOKEN < full_bytes
    _assert_same_sample(got, want, num_top=0)
    _assert_same_kv(_kv_in_pages(replica, pages, cached, length), want_kv)


def test_bad_chunks_and_cached_prefixes_are_refused(replicas):
    prefill, decode = replicas
    replica = decode["tp4"]
    with pytest.raises(ValueError, match="1 to 32 tokens"):
        replica.prefill_local([LocalChunk(list(range(33)), 0, [1, 2, 3, 4, 5], GREEDY_TOP)])
    with pytest.raises(ValueError, match="cannot hold positions up to 20"):
        replica.prefill_local([LocalChunk(list(range(10)), 10, [1, 2], GREEDY_TOP)])
    with pytest.raises(ValueError, match="scratch page"):
        replica.prefill_local([LocalChunk(list(range(10)), 0, [0, 2], GREEDY_TOP)])
    with pytest.raises(ValueError, match="same page"):
        replica.prefill_local([LocalChunk(list(range(8)), 0, [1, 2], GREEDY_TOP),
                               LocalChunk(list(range(8)), 4, [1, 2], GREEDY_TOP)])
    with pytest.raises(ValueError, match="multiple of page_size=8"):
        prefill.run_batch([PromptInput(list(range(20)), GREEDY_TOP, cached_tokens=12)])
    with pytest.raises(ValueError, match="below the prompt's 16 tokens"):
        prefill.run_batch([PromptInput(list(range(16)), GREEDY_TOP, cached_tokens=16)])


@pytest.mark.parametrize("every_block", [False, True], ids=["live blocks", "every block (CUDA)"])
def test_paged_chunk_attention_reads_only_its_live_pages(every_block):
    """Over pools where every page but the sequence's holds NaN, and the sequence's last page holds NaN
    past its live positions, the paged recurrence equals the dense one over the same keys: pages past
    ``end`` are never weighted, and their values are zeroed before they meet a zero weight. The same when
    the loop visits every block of the table, as on a CUDA GPU (a known trip count: no host round trip per
    block), where the NaN blocks past ``end`` are visited too."""
    rng = np.random.default_rng(5)
    kv_heads, page_size, head_dim, start, n = 2, 8, 16, 13, 9  # positions 13..21, pages 0..2 of the row
    k_pages = np.full((kv_heads, 12, page_size, head_dim), np.nan, np.float32)
    v_pages = k_pages.copy()
    row = np.array([7, 3, 9, 0, 0, 0, 0, 0], np.int32)  # padding entries: page 0, NaN too
    dense_k = rng.standard_normal((24, kv_heads, head_dim)).astype(np.float32)
    dense_v = rng.standard_normal((24, kv_heads, head_dim)).astype(np.float32)
    for i, page in enumerate(row[:3]):
        k_pages[:, page] = dense_k[i * page_size : (i + 1) * page_size].transpose(1, 0, 2)
        v_pages[:, page] = dense_v[i * page_size : (i + 1) * page_size].transpose(1, 0, 2)
    k_pages[:, 9, 6:] = v_pages[:, 9, 6:] = np.nan  # position 22 on: not written yet
    q = rng.standard_normal((16, 4, head_dim)).astype(np.float32)  # 9 real queries, 7 padding
    got = paged_chunk_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(row),
                                jnp.int32(start), jnp.int32(start + n), pages_per_block=2, window=6,
                                every_block=every_block)
    want = chunk_attention(jnp.asarray(q[:n]), jnp.asarray(dense_k), jnp.asarray(dense_v), jnp.int32(start),
                           block=8, window=6)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got[:n], want, atol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_visiting_every_block_gives_the_live_blocks_result(window):
    """``chunk_attention`` over a buffer of eight 8-token blocks for chunks at its start, middle and end:
    visiting every block (CUDA's loop) equals visiting the live ones, since a dead block's weights are
    exact zeros that leave the running max, sum and accumulator as they were."""
    rng = np.random.default_rng(11)
    k_buf, v_buf = (jnp.asarray(rng.standard_normal((64, 2, 16)), jnp.float32) for _ in range(2))
    for start in (0, 24, 56):
        q = jnp.asarray(rng.standard_normal((8, 4, 16)), jnp.float32)
        live, every = (chunk_attention(q, k_buf, v_buf, jnp.int32(start), block=8, window=window,
                                       every_block=every_block) for every_block in (False, True))
        np.testing.assert_array_equal(np.asarray(every), np.asarray(live), err_msg=f"start {start}")


def _loops_of_unknown_trip_count(module: str) -> int:
    """``stablehlo.while`` loops whose condition compares the counter with anything but a constant: on a
    GPU, XLA runs those by reading the predicate on the host every iteration."""
    constants = set(re.findall(r"^\s*(%[\w#]+) = stablehlo\.constant", module, re.M))
    loop_bound = r"stablehlo\.while.*\n\s*cond \{\n\s*%[\w#]+ = stablehlo\.compare\s+LT, %[\w#]+, (%[\w#]+)"
    bounds = re.findall(loop_bound, module)
    assert bounds or "stablehlo.while" not in module
    return sum(bound not in constants for bound in bounds)


@pytest.mark.parametrize("platform", ["cuda", "cpu"])
def test_chunk_attention_loops_a_known_trip_count_on_cuda_only(platform):
    """Lowered for CUDA, the dense and paged chunk attention loop over every block (a constant bound, which
    XLA runs without the host); for the CPU, over the live blocks (a bound computed from the chunk)."""
    q, buf = jnp.zeros((8, 4, 16)), jnp.zeros((64, 2, 16))
    pages, row = jnp.zeros((2, 8, 8, 16)), jnp.zeros((8,), jnp.int32)
    dense = jax.jit(lambda q, k, v, s: chunk_attention(q, k, v, s, block=8))
    paged = jax.jit(lambda q, k, v, r, s: paged_chunk_attention(q, k, v, r, s, s + 8, pages_per_block=2))
    for fn, args in ((dense, (q, buf, buf, jnp.int32(0))), (paged, (q, pages, pages, row, jnp.int32(0)))):
        module = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
        assert _loops_of_unknown_trip_count(module) == (0 if platform == "cuda" else 1)
