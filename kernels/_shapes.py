"""Shape validation shared by every backend.

Each backend relies on the same layout contract; checking it once, with messages that name the offending
argument, keeps the kernels free of defensive code and turns layout mistakes into errors at trace time
instead of silent garbage (Pallas kernels do no bounds checks on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Dims:
    """Static sizes of one paged-attention call."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    total_pages: int
    page_size: int
    max_pages: int

    @property
    def group(self) -> int:
        """Query heads sharing one kv head (the GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


def check_inputs(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    window: int | None = None,
) -> Dims:
    """Validate the layout contract of `paged_attention` and return the static sizes."""
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            "k_pages and v_pages must both be [num_kv_heads, total_pages, page_size, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, total_pages, page_size, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the pages ({kv_head_dim}) differ")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if page_table.ndim != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be [batch={batch}, max_pages_per_seq], got {page_table.shape}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got {lengths.shape}")
    for name, arr in (("page_table", page_table), ("lengths", lengths)):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    return Dims(batch, num_q_heads, num_kv_heads, head_dim, total_pages, page_size, page_table.shape[1])


def out_struct(shape: tuple[int, ...], dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """Output type for a `pallas_call` that also works inside `jax.shard_map(check_vma=True)`.

    Under shard_map, Pallas requires every output to declare the mesh axes it varies over; a kernel output
    varies over every axis any of its inputs varies over (e.g. the tensor-parallel head axis).
    """
    mats = [jax.typeof(x).mat for x in inputs]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mats[0])(varying=varying))
