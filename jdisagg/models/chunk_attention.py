"""Attention of one prompt chunk over the keys of the chunks before it, block by block (online softmax).

A long prompt is prefilled chunk by chunk (``jdisagg.programs.chunk_prefill_fn``): chunk ``c`` attends to
the keys of chunks ``0..c``, kept in a dense per-prompt buffer. Scoring a chunk against the whole buffer at
once would materialise ``[heads, chunk, context]`` floats; here the keys are visited in blocks with a
running max, a running sum and a rescaled accumulator (the flash-attention recurrence), so the scores in
memory are ``[heads, chunk, block]`` whatever the context.

The loop runs from the first block a sliding window can reach to the last block holding a key at or before
the chunk's last position: a dynamic trip count (``lax.fori_loop`` with traced bounds), so one compiled
program serves every chunk of every prompt and an early chunk reads only the live prefix of the buffer, not
its capacity. Except on a GPU: XLA runs a loop of unknown trip count there by copying its predicate to
the host and blocking the launching thread on it every iteration, of every layer, so the chunk would
advance at the host's round-trip pace with the device idle between blocks. There the loop visits every
block of the buffer (a known trip count, which XLA runs without the host) and the blocks past the live
ones add nothing: their scores are masked, their weights exactly 0, the running max and sum unchanged, so
the result is the same (a test compares). The price is reading the whole capacity (the prompt's buffer, or
a local chunk's page table of ``max_context`` pages) every layer instead of the live prefix; not yet
timed against the loop it replaces on a GPU. Plain XLA on every platform (CPU, GPU, TPU): no Pallas
kernel or cuDNN call is needed for the recurrence, and the chunk's matmuls are large enough that XLA's
fusions keep the device busy.

``paged_chunk_attention`` is the same recurrence over a decode replica's page pools instead of a dense
buffer: each block is gathered from the sequence's pages as it is visited (local prefill on the decode
replica, ``jdisagg.local_prefill``), so no dense copy of the context is made.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def chunk_attention(
    q: jax.Array, k_buf: jax.Array, v_buf: jax.Array, start: jax.Array, *, block: int,
    window: int | None = None, every_block: bool | None = None,
) -> jax.Array:
    """Causal GQA of a chunk's queries over a key buffer, in key blocks of ``block`` tokens.

    q ``[T, H, hd]`` holds positions ``start .. start + T - 1``; k_buf/v_buf ``[S, KVH, hd]`` (S a multiple
    of ``block``) hold the keys of positions ``0 .. start + T - 1`` at those indices (the chunk's own
    included), anything beyond is never weighted. Query i attends to keys j <= i (and j > i - window with a
    sliding ``window``); query head h reads kv head ``h // (H // KVH)``. Scale ``hd ** -0.5``; scores,
    softmax and the accumulator in float32. Returns ``[T, H, hd]`` in q's dtype. ``every_block``: visit
    every block of the buffer, not only the live ones (None: on a GPU only, see the module's doc).
    """

    def load(b):
        return (lax.dynamic_slice_in_dim(k_buf, b * block, block),
                lax.dynamic_slice_in_dim(v_buf, b * block, block))

    return _blockwise(q, load, start, start + q.shape[0], block=block, kv_heads=k_buf.shape[1], window=window,
                      num_blocks=k_buf.shape[0] // block, every_block=every_block)


def paged_chunk_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_row: jax.Array, start: jax.Array,
    end: jax.Array, *, pages_per_block: int, window: int | None = None, every_block: bool | None = None,
) -> jax.Array:
    """``chunk_attention`` over one sequence's pages: k_pages/v_pages ``[KVH, pages, page_size, hd]`` (a
    decode replica's pools), ``page_row`` ``[W]`` its page table (W a multiple of ``pages_per_block``).

    Only keys before ``end`` (the chunk's last real position + 1) are weighted, by every query (a padding
    query past it that sees none gives zeros): the pages past it may hold another sequence's data or the
    scratch page's garbage, so their values are zeroed too before they meet a zero weight (0 * NaN would
    still be NaN), and padding tokens never write anything but finite values into the scratch page.
    """
    kvh, _, page_size, hd = k_pages.shape
    block = pages_per_block * page_size

    def gather(pages: jax.Array, b) -> jax.Array:
        ids = lax.dynamic_slice_in_dim(page_row, b * pages_per_block, pages_per_block)
        return pages[:, ids].reshape(kvh, block, hd).transpose(1, 0, 2)

    def load(b):
        live = (b * block + jnp.arange(block) < end)[:, None, None]
        return gather(k_pages, b), jnp.where(live, gather(v_pages, b), 0)

    return _blockwise(q, load, start, end, block=block, kv_heads=kvh, window=window,
                      num_blocks=page_row.shape[0] // pages_per_block, every_block=every_block)


def _blockwise(
    q: jax.Array, load: Callable[[jax.Array], tuple[jax.Array, jax.Array]], start: jax.Array,
    end: jax.Array, *, block: int, kv_heads: int, window: int | None, num_blocks: int,
    every_block: bool | None,
) -> jax.Array:
    """The online-softmax loop over key blocks ``load(b)`` -> (keys, values) ``[block, KVH, hd]`` of
    positions ``b * block ..``, for the blocks a query in ``start .. start + T - 1`` can see, up to the one
    holding position ``end - 1`` (or all ``num_blocks``, see ``every_block`` above); keys at ``end`` and
    after are never weighted. Values meet the weights in
    q's dtype (a bfloat16 page pool under a float32 model is widened, not the weights narrowed); returns
    ``[T, H, hd]`` in q's dtype."""
    t, h, hd = q.shape
    kvh = kv_heads
    grouped = q.reshape(t, kvh, h // kvh, hd)
    query_pos = start + jnp.arange(t)
    last_block = (end + block - 1) // block
    first_block = 0 if window is None else jnp.maximum(start - window + 1, 0) // block
    lowest = jnp.finfo(jnp.float32).min

    def visit(b, carry):
        running_max, running_sum, acc = carry
        keys, values = load(b)
        scores = jnp.einsum("tkgd,skd->kgts", grouped, keys, preferred_element_type=jnp.float32) * hd**-0.5
        key_pos = b * block + jnp.arange(block)
        visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] < end)
        if window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - window
        scores = jnp.where(visible, scores, lowest)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        # Masked keys get weight 0 explicitly: a row with nothing visible yet has new_max == lowest.
        weights = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + weights.sum(axis=-1)
        update = jnp.einsum("kgts,skd->kgtd", weights.astype(q.dtype), values.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        return new_max, running_sum, acc * rescale[..., None] + update

    shape = (kvh, h // kvh, t)
    init = (jnp.full(shape, lowest, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, hd), jnp.float32))
    def live_blocks():
        return lax.fori_loop(first_block, last_block, visit, init)

    def all_blocks():  # a dead block leaves the carry as it was: max, sum and acc see only exact zeros
        return lax.fori_loop(0, num_blocks, visit, init)

    if every_block is None:
        _, total, acc = lax.platform_dependent(cuda=all_blocks, rocm=all_blocks, default=live_blocks)
    else:
        _, total, acc = all_blocks() if every_block else live_blocks()
    # Every real query sees at least its own key; a padding query of an empty chunk may see none.
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.transpose(2, 0, 1, 3).reshape(t, h, hd).astype(q.dtype)
