"""Paged-attention kernels against an independent numpy oracle, on CPU.

The Pallas kernels run in interpret mode here (the GPU kernel with `interpret=True`, the TPU kernel in
the TPU interpreter); their real lowerings (Triton IR, Mosaic) are checked by exporting for CUDA/TPU,
which needs no accelerator. Inputs are poisoned where the kernels must not look: unused pool pages and
the tail of each sequence's last page hold NaN, and unused page-table entries are out of range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jdisagg.kernels import available_backends, paged_attention, paged_attention_reference

BACKENDS = ["reference", "interpret", "tpu-interpret"]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    """One ragged batch: lengths include 1 token, exactly-full pages and 0 (an idle padding slot)."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    max_pages: int
    lengths: tuple[int, ...]
    pages_per_block: int | None  # small values force several blocks and split-K in the GPU kernel


CASES = {
    "gqa1-page8-splitk": Case(2, 2, 32, 8, 6, (1, 16, 45, 0), 2),
    "gqa4-page16": Case(8, 2, 64, 16, 4, (64, 17, 0), None),
    "gqa8-page32-splitk": Case(8, 1, 32, 32, 3, (33, 1), 1),
}


def make_inputs(case: Case, dtype, seed: int = 0, window: int | None = None):
    """Random inputs in a scattered page pool, NaN wherever a correct kernel must not read (with a sliding
    ``window``, that includes every token before it)."""
    rng = np.random.default_rng(seed)
    batch = len(case.lengths)
    total_pages = batch * case.max_pages + 3
    shape = (case.num_kv_heads, total_pages, case.page_size, case.head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q = rng.standard_normal((batch, case.num_q_heads, case.head_dim)).astype(np.float32)
    order = rng.permutation(total_pages)
    page_table = np.empty((batch, case.max_pages), np.int64)
    used = np.zeros(total_pages, bool)
    for b, length in enumerate(case.lengths):
        n = -(-length // case.page_size)
        pages = order[b * case.max_pages : b * case.max_pages + n]
        page_table[b, :n] = pages
        page_table[b, n:] = [2**30, -7][b % 2]  # garbage, out of range both ways
        used[pages] = True
        tail = length % case.page_size
        if tail:
            k[:, pages[-1], tail:] = np.nan
            v[:, pages[-1], tail:] = np.nan
        hidden = np.arange(max(0, length - window)) if window else np.arange(0)
        k[:, pages[hidden // case.page_size], hidden % case.page_size] = np.nan
        v[:, pages[hidden // case.page_size], hidden % case.page_size] = np.nan
    k[:, ~used] = np.nan
    v[:, ~used] = np.nan
    arrays = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype))
    return *arrays, jnp.asarray(page_table, jnp.int32), jnp.asarray(case.lengths, jnp.int32)


def numpy_attention(q, k_pages, v_pages, page_table, lengths, scale, window=None):
    """Float64 oracle written per sequence and head, sharing no code with the kernels; length 0 -> 0.
    A sliding ``window`` keeps the last ``window`` tokens of each sequence."""
    q, k_pages, v_pages = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k_pages, v_pages))
    page_table, lengths = np.asarray(page_table), np.asarray(lengths)
    batch, num_q_heads, _ = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    out = np.zeros_like(q)
    for b in range(batch):
        if lengths[b] == 0:
            continue
        tokens = np.arange(lengths[b] - min(lengths[b], window or lengths[b]), lengths[b])
        pages, slots = page_table[b, tokens // page_size], tokens % page_size
        for h in range(num_q_heads):
            k = k_pages[h // group, pages, slots]
            v = v_pages[h // group, pages, slots]
            logits = k @ q[b, h] * scale
            w = np.exp(logits - logits.max())
            out[b, h] = w @ v / w.sum()
    return out


def relative_error(out, expected) -> float:
    """Max abs error relative to the largest output magnitude (robust to outputs near zero)."""
    got = np.asarray(out.astype(jnp.float32), np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# Every backend sees both dtypes and every GQA ratio / page size, without the full cross product
# (interpret-mode compiles dominate the run time on a small CPU box).
CASE_DTYPES = [
    ("gqa1-page8-splitk", jnp.float32),
    ("gqa1-page8-splitk", jnp.bfloat16),
    ("gqa4-page16", jnp.bfloat16),
    ("gqa8-page32-splitk", jnp.float32),
]


@pytest.mark.parametrize(
    ("case_name", "dtype"), CASE_DTYPES, ids=[f"{c}-{jnp.dtype(d).name}" for c, d in CASE_DTYPES]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_numpy(backend, case_name, dtype):
    case = CASES[case_name]
    args = make_inputs(case, dtype)
    scale = case.head_dim**-0.5
    out = paged_attention(*args, scale=scale, backend=backend, pages_per_block=case.pages_per_block)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert relative_error(out, numpy_attention(*args, scale)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("window", [1, 12])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_matches_numpy(backend, window):
    """Windows shorter than a sequence, across page and block boundaries (split-K in the GPU kernel);
    the tokens before each window are NaN, so reading one fails the comparison."""
    case = Case(4, 2, 32, 8, 6, (1, 16, 45, 0, 30, 12), 2)
    args = make_inputs(case, jnp.float32, seed=4, window=window)
    out = paged_attention(*args, scale=0.2, window=window, backend=backend, pages_per_block=2)
    assert relative_error(out, numpy_attention(*args, 0.2, window)) <= 1e-5


def test_window_must_be_positive():
    args = make_inputs(CASES["gqa4-page16"], jnp.float32)
    with pytest.raises(ValueError, match="window"):
        paged_attention(*args, scale=0.1, window=0)


def test_default_backend_under_jit_is_reference_on_cpu():
    args = make_inputs(CASES["gqa4-page16"], jnp.float32, seed=1)
    out = jax.jit(functools.partial(paged_attention, scale=0.125))(*args)
    np.testing.assert_array_equal(out, paged_attention_reference(*args, scale=0.125))
    assert available_backends()[:3] == ("reference", "interpret", "tpu-interpret")


@pytest.mark.parametrize("backend", [None, "interpret", "tpu-interpret"])
def test_shard_map_over_heads(backend):
    """The engine calls the kernel per tensor-parallel shard with its local q and kv heads."""
    case = Case(8, 2, 32, 8, 3, (20, 1, 24), None)
    args = make_inputs(case, jnp.float32, seed=2)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    specs = (P(None, "tp"), P("tp"), P("tp"), P(), P())
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    local = functools.partial(paged_attention, scale=0.2, backend=backend)
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(None, "tp")))
    assert relative_error(sharded(*args), numpy_attention(*args, 0.2)) <= 1e-5


@pytest.mark.parametrize(
    ("platform", "custom_call"), [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_accelerators(platform, custom_call):
    """Lowering to Triton IR / Mosaic needs no device: catches unsupported ops and non-power-of-two tiles."""
    batch, heads, kv_heads, dim, page, pages, pool = 4, 32, 8, 128, 16, 64, 300
    shapes = [(batch, heads, dim), (kv_heads, pool, page, dim), (kv_heads, pool, page, dim)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args += [jax.ShapeDtypeStruct((batch, pages), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)]
    f = jax.jit(functools.partial(paged_attention, scale=dim**-0.5))
    checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
    module = export.export(f, platforms=[platform], disabled_checks=checks)(*args).mlir_module()
    assert custom_call in module


def test_non_power_of_two_head_dim():
    """The Triton kernel refuses it by name; the default backend still works (reference on CPU)."""
    args = make_inputs(Case(2, 2, 48, 8, 2, (3,), None), jnp.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        paged_attention(*args, scale=0.1, backend="interpret")
    assert relative_error(paged_attention(*args, scale=0.1), numpy_attention(*args, 0.1)) <= 1e-5
