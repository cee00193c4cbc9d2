"""Pallas GPU (Triton) paged decode attention, flash-decoding style.

Grid is (batch, kv_head, split). One program owns every query head of one kv-head group, so each K/V
page is read from HBM exactly once per group (decode is bandwidth-bound: that read is the whole cost).
Inside a program, the pages of its split are streamed in blocks of `pages_per_block` pages (one gathered,
contiguous-per-page load of `pages_per_block * page_size` tokens) with an online softmax in float32.

When batch * kv_heads is too small to fill the GPU (long contexts, small batches), the page range is cut
into `k_splits` splits that run as independent programs; each writes a normalised partial output plus its
log-sum-exp, and a tiny XLA epilogue merges them. With a single split the kernel writes the final output
directly and the epilogue is skipped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._shapes import Dims, check_inputs, out_struct

_LOG2E = math.log2(math.e)
# Enough concurrent programs to keep every SM of an H100 (132 SMs) busy with several resident programs;
# below this, the page range is split (flash-decoding) to create more parallelism.
_TARGET_PROGRAMS = 1024
# Tensor-core dots need at least 16 rows, so small GQA groups are zero-padded up to this many q rows.
_MIN_BLOCK_H = 16


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def default_pages_per_block(page_size: int) -> int:
    """Pages per block such that one block holds 64 tokens (a 16 KiB bf16 K tile at head_dim 128): on an
    H200 this beat 128- and 256-token blocks by 8-10 % over the four benchmark shapes (docs/kernels.md)."""
    return max(1, 64 // page_size)


def default_k_splits(batch: int, num_kv_heads: int, num_page_blocks: int) -> int:
    """Smallest split count that gives about `_TARGET_PROGRAMS` programs, never more than one per block."""
    programs = batch * num_kv_heads
    return max(1, min(num_page_blocks, -(-_TARGET_PROGRAMS // programs)))


def _kernel(
    q_ref,  # [block_h, head_dim]
    k_ref,  # [total_pages, page_size, head_dim] (this program's kv head)
    v_ref,  # [total_pages, page_size, head_dim]
    pt_ref,  # [pages_per_split] (this program's slice of the page table)
    len_ref,  # [1]
    o_ref,  # [block_h, head_dim]
    lse_ref,  # [block_h], log2-domain log-sum-exp of this split
    *,
    scale: float,
    window: int | None,
    pages_per_block: int,
    precision: lax.Precision,
):
    total_pages, page_size, head_dim = k_ref.shape
    pages_per_split = pt_ref.shape[0]
    block_tokens = pages_per_block * page_size
    length = len_ref[0]
    first_page = pl.program_id(2) * pages_per_split
    # Only blocks holding at least one token below `length` are visited: garbage pages are never loaded
    # except in the tail of the last block, where they are clamped in range and masked.
    seq_pages = pl.cdiv(length, page_size)
    blocks_left = pl.cdiv(seq_pages - first_page, pages_per_block)
    num_blocks = jnp.clip(blocks_left, 0, pages_per_split // pages_per_block)
    # A sliding window also skips the blocks wholly before it, so each visited block holds a visible token
    # (the online softmax's running max is then finite after the first one).
    window_start = 0 if window is None else jnp.maximum(length - window, 0)
    first_block = jnp.clip((window_start // page_size - first_page) // pages_per_block, 0, num_blocks)
    q = q_ref[...]
    block_h = q.shape[0]

    def body(j, carry):
        acc, m, denom = carry
        pages = jnp.clip(pt_ref[pl.ds(j * pages_per_block, pages_per_block)], 0, total_pages - 1)
        k = k_ref[pages].reshape(block_tokens, head_dim)
        v = v_ref[pages].reshape(block_tokens, head_dim)
        pos = (first_page + j * pages_per_block) * page_size + jnp.arange(block_tokens, dtype=jnp.int32)
        valid = (pos < length) & (pos >= window_start)
        # Logits in the log2 domain (scale folded with log2(e)) so the softmax uses the cheaper exp2.
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        s = jnp.where(valid[None, :], s * (scale * _LOG2E), -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        # Zero masked V rows too: p == 0 there, but 0 * NaN from a garbage page would still be NaN.
        v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype))
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
        return acc * alpha[:, None] + pv, m_new, denom * alpha + p.sum(axis=1)

    init = (
        jnp.zeros((block_h, head_dim), jnp.float32),
        jnp.full((block_h,), -jnp.inf, jnp.float32),
        jnp.zeros((block_h,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(first_block, num_blocks, body, init)
    # An empty split (all its pages past `length`) has denom == 0: emit 0, lse = -inf, so it weighs nothing.
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(denom)


def _merge_splits(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Combine per-split normalised outputs [b, kv, split, h, d] weighted by their log2-sum-exp."""
    lse_max = lse.max(axis=2, keepdims=True)
    # Every split is empty only for a length-0 (padding) slot: keep its weights 0 and its output 0.
    w = jnp.exp2(lse - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
    total = w.sum(axis=2)[..., None]
    return (o * w[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)


@dataclass(frozen=True)
class Plan:
    """How the page range of every sequence is cut: blocks of `pages_per_block`, `splits` programs each."""

    pages_per_block: int
    splits: int
    pages_per_split: int


def _pages_per_block(d: Dims, pages_per_block: int | None) -> int:
    return min(pages_per_block or default_pages_per_block(d.page_size), pl.next_power_of_2(d.max_pages))


def unsupported_reason(d: Dims, pages_per_block: int | None = None) -> str | None:
    """Why the Triton kernel cannot run these shapes (its tiles must be powers of two), or None."""
    ppb = _pages_per_block(d, pages_per_block)
    for name, value in (("page_size", d.page_size), ("head_dim", d.head_dim), ("pages_per_block", ppb)):
        if not _is_pow2(value):
            return f"the GPU paged-attention kernel needs a power-of-two {name}, got {value}"
    return None


def plan(d: Dims, pages_per_block: int | None = None, k_splits: int | None = None) -> Plan:
    """Pick the blocking: blocks of `pages_per_block` pages, split-K when there are too few programs."""
    reason = unsupported_reason(d, pages_per_block)
    if reason:
        raise ValueError(reason)
    ppb = _pages_per_block(d, pages_per_block)
    num_page_blocks = pl.cdiv(d.max_pages, ppb)
    splits = k_splits or default_k_splits(d.batch, d.num_kv_heads, num_page_blocks)
    blocks_per_split = pl.cdiv(num_page_blocks, splits)
    splits = pl.cdiv(num_page_blocks, blocks_per_split)  # drop splits that would always be empty
    return Plan(ppb, splits, blocks_per_split * ppb)


def paged_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    pages_per_block: int | None = None,
    k_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Paged decode attention with the Triton kernel; `interpret=True` runs the same body on CPU.

    Constraints (Triton loads and dots need power-of-two tiles): page_size, head_dim and pages_per_block
    must be powers of two. The GQA group is zero-padded to a power of two >= 16 rows; those rows cost
    tensor-core work but no HBM traffic, which is what bounds decode.
    """
    d = check_inputs(q, k_pages, v_pages, page_table, lengths, window)
    p = plan(d, pages_per_block, k_splits)
    block_h = max(_MIN_BLOCK_H, pl.next_power_of_2(d.group))
    qg = q.reshape(d.batch, d.num_kv_heads, d.group, d.head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, block_h - d.group), (0, 0)))
    # Pad the table so every split is a whole number of blocks; padded entries lie past every length.
    page_table = jnp.pad(page_table, ((0, 0), (0, p.splits * p.pages_per_split - d.max_pages)))
    inputs = (qg, k_pages, v_pages, page_table, lengths.reshape(d.batch, 1))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    # A single split writes the final output directly; partial outputs of several splits stay float32.
    out_dtype = q.dtype if p.splits == 1 else jnp.float32
    pool_spec = pl.BlockSpec((None, d.total_pages, d.page_size, d.head_dim), lambda b, h, s: (h, 0, 0, 0))
    o, lse = pl.pallas_call(
        functools.partial(
            _kernel, scale=scale, window=window, pages_per_block=p.pages_per_block, precision=precision
        ),
        grid=(d.batch, d.num_kv_heads, p.splits),
        in_specs=[
            pl.BlockSpec((None, None, block_h, d.head_dim), lambda b, h, s: (b, h, 0, 0)),
            pool_spec,
            pool_spec,
            pl.BlockSpec((None, p.pages_per_split), lambda b, h, s: (b, s)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, d.head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            out_struct((d.batch, d.num_kv_heads, p.splits, block_h, d.head_dim), out_dtype, *inputs),
            out_struct((d.batch, d.num_kv_heads, p.splits, block_h), jnp.float32, *inputs),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"paged_attention_ppb{p.pages_per_block}_splits{p.splits}",
    )(*inputs)
    out = o[:, :, 0] if p.splits == 1 else _merge_splits(o, lse)
    return out[:, :, : d.group].reshape(q.shape).astype(q.dtype)
