"""Pallas TPU (Mosaic) paged decode attention.

The page table and lengths are scalar-prefetched into SMEM so the BlockSpec index maps can look pages up:
grid step (b, h, i) fetches the `pages_per_block` pages of block i of sequence b, one BlockSpec (and one
pipelined DMA) per page, so Pallas double-buffers the HBM->VMEM copies without hand-written DMA code.
Page indices past a sequence's last page are clamped to that last page: consecutive grid steps then ask
for the same block, which Pallas does not re-fetch, so steps past `length` cost no HBM traffic and
garbage table entries are never dereferenced. The online-softmax state lives in VMEM scratch across the
innermost (sequential) grid axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._shapes import check_inputs, out_struct


def default_pages_per_block(page_size: int) -> int:
    """Pages per grid step such that a step covers 128 tokens, amortising the per-step overhead."""
    return max(1, 128 // page_size)


def _kernel(
    len_ref,
    pt_ref,
    q_ref,
    *refs,
    scale: float,
    window: int | None,
    pages_per_block: int,
    precision: lax.Precision,
):
    del pt_ref  # only used by the index maps
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block : 2 * pages_per_block]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block :]
    b, i = pl.program_id(0), pl.program_id(2)
    page_size = k_refs[0].shape[0]
    length = len_ref[b]
    window_start = 0 if window is None else jnp.maximum(length - window, 0)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for j in range(pages_per_block):
        start = (i * pages_per_block + j) * page_size

        # Pages wholly before a sliding window are skipped, so every visited page has a visible token.
        @pl.when((start < length) & (start + page_size > window_start))
        def _update(k_ref=k_refs[j], v_ref=v_refs[j], start=start):
            dims = (((1,), (1,)), ((), ()))
            s = lax.dot_general(
                q_ref[...], k_ref[...], dims, preferred_element_type=jnp.float32, precision=precision
            )
            pos = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            valid = (pos < length) & (pos >= window_start)
            s = jnp.where(valid, s * scale, -jnp.inf)
            m_prev = m_ref[...]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            v = v_ref[...]
            # Rows past `length` in the last page are stale (maybe NaN): p == 0 there, but 0 * NaN is NaN.
            v_pos = start + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v_valid = (v_pos < length) & (v_pos >= window_start)
            v = jnp.where(v_valid, v, jnp.zeros((), v.dtype))
            pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
            m_ref[...] = m_new
            l_ref[...] = l_ref[...] * alpha + p.sum(axis=1, keepdims=True)
            acc_ref[...] = acc_ref[...] * alpha + pv

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        denom = l_ref[...]  # 0 only for a length-0 (padding) slot, which then outputs 0
        o_ref[...] = (acc_ref[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def paged_attention_tpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Paged decode attention with the Mosaic kernel; `interpret=True` uses the TPU interpreter on CPU."""
    d = check_inputs(q, k_pages, v_pages, page_table, lengths, window)
    ppb = min(pages_per_block or default_pages_per_block(d.page_size), d.max_pages)
    num_blocks = pl.cdiv(d.max_pages, ppb)

    def page_map(j: int):
        def index_map(b, h, i, len_ref, pt_ref):
            length = len_ref[b]
            last_page = jnp.maximum(lax.div(length + d.page_size - 1, d.page_size) - 1, 0)
            # Before a sliding window, ask for its first page: repeated blocks are not fetched again.
            first_page = 0 if window is None else lax.div(jnp.maximum(length - window, 0), d.page_size)
            page = pt_ref[b, jnp.clip(i * ppb + j, first_page, last_page)]
            return h, jnp.clip(page, 0, d.total_pages - 1), 0, 0

        return pl.BlockSpec((None, None, d.page_size, d.head_dim), index_map)

    page_specs = [page_map(j) for j in range(ppb)]
    qg = q.reshape(d.batch, d.num_kv_heads, d.group, d.head_dim)
    head_spec = pl.BlockSpec((None, None, d.group, d.head_dim), lambda b, h, i, *_: (b, h, 0, 0))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, window=window, pages_per_block=ppb, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(d.batch, d.num_kv_heads, num_blocks),
            in_specs=[head_spec, *page_specs, *page_specs],
            out_specs=head_spec,
            scratch_shapes=[
                pltpu.VMEM((d.group, 1), jnp.float32),
                pltpu.VMEM((d.group, 1), jnp.float32),
                pltpu.VMEM((d.group, d.head_dim), jnp.float32),
            ],
        ),
        out_shape=out_struct(qg.shape, q.dtype, qg, k_pages, v_pages, page_table, lengths),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"paged_attention_tpu_ppb{ppb}",
    )(lengths, page_table, qg, *([k_pages] * ppb), *([v_pages] * ppb))
    return out.reshape(q.shape)
