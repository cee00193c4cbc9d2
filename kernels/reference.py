"""Pure-jnp paged attention: the numerical reference and the CPU fast path.

Everything is one batched gather plus two einsums, so XLA fuses it and there is no Python loop over the
batch; this is what makes it usable as the production CPU path and not only as a test oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._shapes import check_inputs


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Decode attention of one query token per sequence over its paged KV cache.

    With a sliding ``window`` the query (at position ``length - 1``) sees only the last ``window`` tokens,
    positions ``length - window .. length - 1``, as Mistral-style models were trained to.

    Page-table entries past a sequence's length are garbage and may be out of range, so they are clamped
    before the gather (the gathered values are then masked). Masking is applied to the logits *and* to
    V, because a masked probability of 0 times a NaN in an unused page would still be NaN.
    """
    d = check_inputs(q, k_pages, v_pages, page_table, lengths, window)
    pages = jnp.clip(page_table, 0, d.total_pages - 1)
    seq = d.max_pages * d.page_size
    # [kv, batch, max_pages, page_size, dim] -> [kv, batch, seq, dim]
    k = k_pages[:, pages].reshape(d.num_kv_heads, d.batch, seq, d.head_dim)
    v = v_pages[:, pages].reshape(d.num_kv_heads, d.batch, seq, d.head_dim)
    positions = jnp.arange(seq)[None, :]
    valid = positions < lengths[:, None]  # [batch, seq]
    if window is not None:
        valid &= positions >= lengths[:, None] - window

    qg = q.reshape(d.batch, d.num_kv_heads, d.group, d.head_dim)
    logits = jnp.einsum(
        "bkgd,kbsd->bkgs", qg, k, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    logits = jnp.where(valid[:, None, None, :], logits * scale, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    v = jnp.where(valid[None, :, :, None], v, jnp.zeros((), v.dtype)).astype(jnp.float32)
    out = jnp.einsum("bkgs,kbsd->bkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    # A length-0 (padding) slot has an all-masked, NaN softmax: define its output as 0 like the kernels.
    out = jnp.where(lengths[:, None, None, None] > 0, out, 0.0)
    return out.reshape(q.shape).astype(q.dtype)
