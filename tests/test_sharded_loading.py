"""Sharded loading: each replica's params go from the checkpoint straight into its sharding.

The bound every device must keep while loading prefill 4x1 + decode 2x2 is (param bytes / tp + the largest
single tensor): its own shard of the split params plus the replicated ones. Loading the model whole onto
one device first (what the engine used to do) puts every param byte on device 0 and breaks it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdisagg.engine import Engine
from jdisagg.meshes import PHASE_RULES, build_layout, param_sharding_fn
from jdisagg.models import ModelConfig
from jdisagg.models.loading import (
    init_model,
    load_hf_model,
    load_model,
    save_checkpoint,
    save_hf_safetensors,
)
from jdisagg.sampling_params import SamplingParams
from jdisagg.tokenizer import ByteTokenizer

# Wide MLPs, so the split params dwarf the replicated ones (embedding, norms) as in a real model.
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=512, num_layers=3, num_heads=8, num_kv_heads=4,
    head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
    tie_word_embeddings=False, attention_bias=False,
)
MAX_CONTEXT = 32  # the longest prompt (20) and its 8 tokens: two prefill buckets to compile


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide_llama")
    save_hf_safetensors(init_model(CONFIG, seed=3), path)
    return path


def _param_sizes() -> tuple[int, int]:
    """(all param bytes, the largest single param's bytes) of ``CONFIG``."""
    abstract = nnx.eval_shape(lambda: init_model(CONFIG, 0))
    sizes = [x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
    return sum(sizes), max(sizes)


def _live_bytes(collect: bool = True) -> dict[jax.Device, int]:
    """Bytes of device buffers alive per device, each buffer once (a sharded array and the per-device
    arrays it was assembled from share their buffers, and ``jax.live_arrays`` lists both). ``collect``:
    garbage is collected first, so arrays nobody holds any more do not count."""
    if collect:
        gc.collect()
    buffers: dict[tuple[jax.Device, int], int] = {}
    for array in jax.live_arrays():
        try:
            shards = [(shard.device, shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
                      for shard in array.addressable_shards]
        except RuntimeError:  # deleted by another thread while listed (a donated or dropped buffer): gone
            continue
        for device, pointer, nbytes in shards:
            buffers[device, pointer] = nbytes
    per_device: dict[jax.Device, int] = {}
    for (device, _), nbytes in buffers.items():
        per_device[device] = per_device.get(device, 0) + nbytes
    return per_device


@contextmanager
def _collect_only_new_objects() -> Iterator[None]:
    """Makes the ``gc.collect()`` of every sample cheap: objects alive now (the whole test session's heap:
    JAX, torch, earlier modules' engines) are frozen out of collection, so a collection walks only what
    was made since, which is where loading's garbage is. A frozen array that becomes garbage would stay
    counted, which can only make the bound stricter."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _over_bound(peaks: dict[jax.Device, int], baseline: dict[jax.Device, int], tp_of) -> dict:
    total, largest = _param_sizes()
    return {
        d: (peak - baseline.get(d, 0), total // tp_of(d) + largest)
        for d, peak in peaks.items()
        if peak - baseline.get(d, 0) > total // tp_of(d) + largest
    }


def test_each_device_reads_only_its_slice(checkpoint):
    """Sampled before every param is read: no device ever exceeds its bound while replicas load."""
    layout = build_layout("4x1", "2x2")
    source, _ = load_model(checkpoint)
    heads = {"num_heads": CONFIG.num_heads, "num_kv_heads": CONFIG.num_kv_heads}
    baseline, peaks, tp = _live_bytes(), {}, {}
    loaded = []
    for phase in (layout.prefill, layout.decode):
        for mesh in phase.replicas:
            tp.update({d: phase.spec.tp for d in mesh.devices.flat})
            shardings = param_sharding_fn(mesh, PHASE_RULES[phase.name], heads)

            def sampled(path, shape, shardings=shardings):
                for device, nbytes in _live_bytes().items():
                    peaks[device] = max(peaks.get(device, 0), nbytes)
                return shardings(path, shape)

            with _collect_only_new_objects():
                loaded.append(source.load(sampled))
    for device, nbytes in _live_bytes().items():
        peaks[device] = max(peaks.get(device, 0), nbytes)
    assert set(tp) == set(jax.devices())
    assert not _over_bound(peaks, baseline, tp.__getitem__)
    # ... and the bound is tight enough to catch the old way: the whole model on one device.
    whole = load_hf_model(checkpoint)
    assert _over_bound(_live_bytes(), baseline, tp.__getitem__)
    del whole
    reference = jax.tree.leaves(nnx.state(load_hf_model(checkpoint), nnx.Param))
    for model in loaded:
        for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), reference, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_engine_load_stays_within_bound_and_outputs_are_unchanged(checkpoint):
    """Live bytes per device polled while the engine loads and compiles; then greedy outputs equal a
    single-device engine's."""
    layout = build_layout("4x1", "2x2")
    tp = {d: p.spec.tp for p in (layout.prefill, layout.decode) for m in p.replicas for d in m.devices.flat}
    baseline, peaks, done = _live_bytes(), {}, threading.Event()
    pages = 2 * (MAX_CONTEXT // 16) + 1
    kv_bytes = 2 * CONFIG.num_layers * pages * 16 * CONFIG.num_kv_heads * CONFIG.head_dim * 4  # all heads

    failures = []

    def poll():
        try:
            while not done.wait(0.01):
                for device, nbytes in _live_bytes(collect=False).items():
                    peaks[device] = max(peaks.get(device, 0), nbytes)
        except Exception as exc:  # noqa: BLE001 - a poller that died would leave the peaks unchecked
            failures.append(exc)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        engine = Engine(checkpoint, tokenizer=ByteTokenizer(), prefill_mesh="4x1", decode_mesh="2x2",
                        max_context=MAX_CONTEXT, max_batch=2, num_pages=pages, progress=False)
    finally:
        done.set()
        poller.join()
    assert not failures, failures
    prompts = [np.random.default_rng(i).integers(0, CONFIG.vocab_size, n).tolist()
               for i, n in enumerate((5, 20))]
    params = SamplingParams(max_tokens=8)
    with engine:
        got = [o.token_ids for o in engine.generate(prompts, params)]
    # The decode devices also hold their page pools (allocated after the params): at most all kv heads.
    total, largest = _param_sizes()
    over = {d: (peak - baseline.get(d, 0), total // tp[d] + largest + kv_bytes)
            for d, peak in peaks.items() if peak - baseline.get(d, 0) > total // tp[d] + largest + kv_bytes}
    assert not over
    with Engine(checkpoint, tokenizer=ByteTokenizer(), max_context=MAX_CONTEXT, max_batch=2,
                progress=False) as single:
        assert got == [o.token_ids for o in single.generate(prompts, params)]
    assert jnp.dtype(engine.config.dtype) == jnp.float32


def test_orbax_checkpoint_restores_into_each_sharding_and_dtype(tmp_path):
    """Our own checkpoints take the same path: a restore with the target sharding (and dtype) per param."""
    save_checkpoint(init_model(CONFIG, seed=3), tmp_path / "ckpt")
    source, _ = load_model(tmp_path / "ckpt", dtype="bfloat16")
    assert source.config.dtype == "bfloat16"
    mesh = build_layout("4x1", "2x2").decode.replicas[1]
    heads = {"num_heads": CONFIG.num_heads, "num_kv_heads": CONFIG.num_kv_heads}
    shardings = param_sharding_fn(mesh, PHASE_RULES["decode"], heads)
    model = source.load(shardings)
    want = nnx.state(init_model(CONFIG, seed=3), nnx.Param)
    for (path, got), (_, expected) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                          nnx.to_flat_state(want), strict=True):
        name = "/".join(map(str, path))
        assert got[...].sharding == shardings(name, got[...].shape), name
        assert got[...].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(expected[...].astype(jnp.bfloat16)))
