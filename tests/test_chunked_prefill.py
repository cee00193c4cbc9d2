"""Long prompts prefilled chunk by chunk, and the full context by default.

A prompt longer than the prefill chunk runs ``prefill_chunk[C]`` once per chunk, each chunk attending
blockwise to the earlier chunks' KV; its hand-off is one KV piece per chunk, inserted with ``insert[C]``.
Checked against a dense (unchunked) forward: the chunk program itself (TP2, sliding window), a 4,096-token
prompt through the whole engine, a long prompt across worker processes; compiled memory that grows linearly
in the prompt; ``jdisagg launch`` with no ``--max-context`` serving a 3,500-token prompt; and the sizing
rules for a context that defaults to the model's.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jdisagg.chunked_prefill import ChunkedPrefill
from jdisagg.compile_counter import cache_hit_count, compile_count
from jdisagg.engine import Engine
from jdisagg.memory import KVShape, pages_for_budget
from jdisagg.meshes import PHASE_RULES, TP_AXIS, parse_mesh_spec
from jdisagg.models import ModelConfig
from jdisagg.models.loading import init_model, load_hf_model, load_model, save_hf_safetensors
from jdisagg.programs import compile_prefill
from jdisagg.replicas import handoff_sharding, model_shape, place_params
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.client import make_request, wait_until_serving
from jdisagg.sizes import plan_sizes
from jdisagg.tokenizer import ByteTokenizer
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc
from jdisagg.v1 import worker_pb2 as wpb
from jdisagg.workers.front import Front, spawn_workers, stop_workers
from jdisagg.workers.handoff import ExpectedKV, KVReceiver, LayoutMismatchError

LONG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4608,
    tie_word_embeddings=False, attention_bias=False,
)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def _dense_logits(module: nnx.Module, ids: list[int]) -> np.ndarray:
    """The unchunked reference: one dense causal forward, float32 logits of every position."""
    tokens = jnp.asarray(ids, jnp.int32)[None]
    return np.asarray(jax.jit(lambda t: module(t, jnp.arange(t.shape[1])[None]))(tokens)[0])


def _assert_greedy_continuation(module: nnx.Module, prompt: list[int], output) -> None:
    """The output is the dense forward's greedy continuation, with its log-probabilities."""
    logits = _dense_logits(module, prompt + output.token_ids[:-1])[len(prompt) - 1 :]
    assert output.token_ids == logits.argmax(-1).tolist()
    logprobs = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(output.token_ids)), output.token_ids]
    np.testing.assert_allclose(output.logprobs, logprobs, atol=2e-3)


def test_chunk_program_matches_dense_prefill_on_tp2_with_a_sliding_window():
    """Three 64-token chunks (the last one padded) over a 40-token window that straddles chunk borders:
    the logits after the prompt and every piece of KV equal the dense prefill's."""
    config = ModelConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
        tie_word_embeddings=False, attention_bias=False, model_type="mistral", sliding_window=40,
    )
    module = init_model(config, seed=1)
    graphdef, state = nnx.split(module)
    mesh = Mesh(np.array(jax.devices()[:2]), (TP_AXIS,))
    params = place_params(state, mesh, PHASE_RULES["prefill"], model_shape(graphdef, state))
    chunked = ChunkedPrefill(mesh, graphdef, params, chunk=64, capacity=256,
                             kv_out=handoff_sharding(mesh, config.num_kv_heads))
    for _, compile_program in chunked.compile_tasks("test"):
        compile_program()
    prompt = np.random.default_rng(0).integers(0, 256, 170).tolist()
    logits, kv = chunked(prompt)
    hidden, dense_kv = module.prefill(jnp.asarray(prompt)[None], jnp.arange(len(prompt))[None])
    np.testing.assert_allclose(logits[0], module.logits(hidden[0, -1]), atol=1e-4)
    assert len(kv.pieces) == 3 and kv.pieces[0][0].shape == (2, 64, 2, 8)
    for which in (0, 1):
        pieces = np.concatenate([np.asarray(piece[which]) for piece in kv.pieces], axis=1)[:, : len(prompt)]
        want = np.stack([np.asarray(layer[which][0]) for layer in dense_kv])
        np.testing.assert_allclose(pieces, want, atol=1e-5)


def test_prefill_memory_grows_linearly_in_the_prompt_not_quadratically():
    """Compiled memory (``memory_analysis``, not live arrays) of a prefill of 1k, 2k and 4k tokens: chunked,
    params + the per-prompt buffer + the KV pieces + one chunk program's temporaries; dense, params + its KV
    output + its temporaries (the [heads, T, T] scores). Linear growth doubles each step's increase, so the
    ratio of the increases is 2 for the chunked path, and about 4 for the dense one, which is quadratic."""
    graphdef, state = nnx.split(init_model(LONG, seed=2))
    mesh = Mesh(np.array(jax.devices()[:1]), (TP_AXIS,))
    kv_out = handoff_sharding(mesh, LONG.num_kv_heads)
    kv_bytes_per_token = 2 * LONG.num_layers * LONG.num_kv_heads * LONG.head_dim * 4
    chunked, dense, chunk_temps = [], [], []
    for tokens in (1024, 2048, 4096):
        program = ChunkedPrefill(mesh, graphdef, state, chunk=512, capacity=tokens, kv_out=kv_out)
        program.compile_tasks("test")[0][1]()
        stats = program._run.memory_analysis()
        pieces = tokens * kv_bytes_per_token
        chunked.append(stats.argument_size_in_bytes + pieces + stats.temp_size_in_bytes)
        chunk_temps.append(stats.temp_size_in_bytes)
        stats = compile_prefill(graphdef, state, mesh, tokens, kv_out).memory_analysis()
        dense.append(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)
    assert chunk_temps[0] == chunk_temps[-1], "a chunk's temporaries must not grow with the prompt"
    growth = (chunked[2] - chunked[1]) / (chunked[1] - chunked[0])
    dense_growth = (dense[2] - dense[1]) / (dense[1] - dense[0])
    assert growth == pytest.approx(2.0, rel=0.05), chunked
    assert dense_growth > 3.5, dense
    assert chunked[2] < dense[2] / 10


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long_llama")
    save_hf_safetensors(init_model(LONG, seed=5), path)
    return path


def test_a_4096_token_prompt_in_chunks_gives_the_dense_forwards_greedy_tokens(long_checkpoint):
    """No max_context: the engine takes the model's 4,608 positions and prefills a 4,096-token prompt in
    eight 512-token chunks; the hand-off is eight pieces. First token, greedy continuation and their
    log-probabilities are the dense forward's, nothing compiles while serving, and no page stays held.
    One prompt has no prefix to reuse, so the prefix cache is off (its hand-off programs would never run)."""
    prompt = np.random.default_rng(1).integers(0, 256, 4096).tolist()
    with Engine(long_checkpoint, tokenizer=ByteTokenizer(), max_batch=1, page_size=64, prefix_cache=False,
                progress=False) as engine:
        assert engine.max_context == LONG.max_position_embeddings
        warm = compile_count(), cache_hit_count()  # the suite's compile cache: a load is no compile
        output = engine.generate([prompt], GREEDY)[0]
        assert (compile_count(), cache_hit_count()) == warm, "a program was compiled while serving"
        assert engine.stats()["pages_used"] == [0]
    _assert_greedy_continuation(load_hf_model(long_checkpoint), prompt, output)


def test_a_long_prompt_across_worker_processes():
    """A TP2 prefill worker hands a 700-token prompt (two chunks of 512) to a TP1 decode worker as one
    transfer offer of two pieces, and a short prompt as one piece; the tokens are the dense forward's
    greedy ones."""
    source, _ = load_model(None)
    sizes = plan_sizes(source.config, page_size=64, max_batch=1, max_context=None, num_pages=None)
    assert sizes.max_context == 1024 and sizes.chunked
    front = Front(None, parse_mesh_spec("2x1"), parse_mesh_spec("1x1"), sizes, pull_timeout_s=20.0,
                  rpc_timeout_s=60.0)
    children = spawn_workers(front, devices_per_worker=2)
    try:
        front.wait_until_full(timeout_s=600.0, children=children)
        prompts = [np.random.default_rng(2).integers(0, 256, n).tolist() for n in (700, 40)]
        outputs = front.engine.generate(prompts, GREEDY)
        assert front.engine.stats()["pages_used"] == [0]
        # 512 + 512 + 64 tokens of k and v: 4 layers x 4 kv heads x 32 dims in float32
        assert front.engine.metrics.transfer_bytes._value.get() == (512 + 512 + 64) * 2 * 4 * 4 * 32 * 4
    finally:
        front.shutdown(drain=False, timeout=5.0)
        stop_workers(children)
    module = source.load()
    for prompt, output in zip(prompts, outputs, strict=True):
        _assert_greedy_continuation(module, prompt, output)


def test_a_decode_worker_refuses_piece_counts_its_context_cannot_hold():
    """Before pulling anything: more chunk pieces than the context holds, pieces that are not chunk-sized,
    or no pieces at all are refused with the numbers."""
    mesh = Mesh(np.array(jax.devices()[:1]), (TP_AXIS,))
    expected = ExpectedKV(4, 4, 32, "float32", lengths=(64, 128, 256, 512), max_tokens=1024)
    receiver = KVReceiver("127.0.0.1", mesh, handoff_sharding(mesh, 4), expected)

    def layout(tokens: int, pieces: int) -> wpb.KVLayout:
        return wpb.KVLayout(shape=[4, tokens, 4, 32], dtype="float32", num_shards=1,
                            checksums=[0.0] * 2 * pieces, num_pieces=pieces)

    receiver.check(layout(512, 2))
    receiver.check(layout(64, 1))
    with pytest.raises(LayoutMismatchError, match=r"3 pieces of 512 tokens are not a chunked prompt here "
                                                  r"\(chunks of 512, at most 1024 tokens\)"):
        receiver.check(layout(512, 3))
    with pytest.raises(LayoutMismatchError, match="2 pieces of 256 tokens"):
        receiver.check(layout(256, 2))
    with pytest.raises(LayoutMismatchError, match="0 pieces"):
        receiver.check(layout(512, 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_without_max_context_serves_a_3500_token_prompt(tmp_path):
    """``jdisagg launch --model DIR --dtype bfloat16`` and no ``--max-context``: the context is the
    checkpoint's 4,096 positions, and a 3,500-token prompt is served (the only prompt: no prefix cache)."""
    config = dataclasses.replace(LONG, max_position_embeddings=4096)
    save_hf_safetensors(init_model(config, seed=6), tmp_path / "model")
    port = _free_port()
    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jdisagg.cli", "launch", "--model", str(tmp_path / "model"), "--dtype",
             "bfloat16", "--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--max-batch", "1", "--page-size",
             "64", "--port", str(port), "--metrics-port", "0", "--http-port", "0", "--no-progress",
             "--compile-cache", "off", "--no-prefix-cache"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(f"127.0.0.1:{port}", 600.0)
        prompt = np.random.default_rng(3).integers(0, 256, 3500).tolist()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = pb_grpc.GenerationStub(channel).GenerateUnary(
                make_request(prompt, max_tokens=4, temperature=0.0, ignore_eos=True), timeout=300)
    except BaseException:
        process.kill()
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    assert reply.usage.prompt_tokens == 3500 and len(reply.token_ids) == 4
    assert "full context of 4096" in log.read_text(errors="replace")


def test_the_context_defaults_to_the_models_and_shrinks_only_to_what_fits():
    sizes = plan_sizes(LONG, page_size=16, max_batch=8, max_context=None, num_pages=None)
    assert (sizes.max_context, sizes.context_from_model, sizes.chunk) == (4608, True, 512)
    assert sizes.prefill_buckets == (16, 32, 64, 128, 256, 512) and sizes.chunk_capacity == 4608
    # No budget (CPU): eight slots of 1,024 tokens, at least one full context; not eight full contexts.
    assert sizes.num_pages == 8 * 64 + 1
    given = plan_sizes(LONG, page_size=16, max_batch=8, max_context=2048, num_pages=None)
    assert (given.num_pages, given.context_from_model) == (8 * 128 + 1, False)
    # A page count too small for the model's context lowers it; below 1,024 tokens it is refused.
    assert plan_sizes(LONG, page_size=16, max_batch=8, max_context=None, num_pages=101).max_context == 1600
    with pytest.raises(ValueError, match=r"num_pages=33 cannot hold one full context \(288 pages"):
        plan_sizes(LONG, page_size=16, max_batch=8, max_context=None, num_pages=33)
    kv = KVShape(LONG.num_layers, LONG.num_kv_heads, LONG.head_dim, tp=1, dtype="float32")
    page = kv.page_bytes(16)
    fitted = pages_for_budget(201 * page, kv, page_size=16, max_context=4608, source="test",
                              context_from_model=True)
    assert (fitted.num_pages, fitted.max_context) == (201, 3200)
    with pytest.raises(ValueError, match=r"holds 201 pages .* the full context 4608 needs 289"):
        pages_for_budget(201 * page, kv, page_size=16, max_context=4608, source="test")
    with pytest.raises(ValueError, match=r"holds 33 pages of 8192 bytes; one sequence of the full context "
                                         r"4608 needs 289 .* the largest context it holds, 512 tokens, is "
                                         r"below the 1024"):
        pages_for_budget(33 * page, kv, page_size=16, max_context=4608, source="test",
                         context_from_model=True)
