"""The paged KV cache's device side: the page pools of a decode replica (``jdisagg.kv_manager`` says who
holds which page).

Pools are ``[kv_heads, pages, page_size, head_dim]`` per layer (the layout the paged-attention kernels read),
kv heads split over the replica's ``tp`` axis. Page 0 (``SCRATCH_PAGE``) is never handed out: padded batch
slots and padded prompt pages write there, so compiled programs need no masks on their writes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.meshes import TP_AXIS

KVPools = list[tuple[jax.Array, jax.Array]]  # per layer (k_pages, v_pages)


def kv_sharding(mesh: Mesh, stored_heads: int, head_axis: int) -> NamedSharding:
    """Shard the kv-heads dimension over ``tp`` when it divides, else replicate."""
    tp = mesh.shape[TP_AXIS]
    spec = [None] * (head_axis + 1)
    if stored_heads % tp == 0:
        spec[head_axis] = TP_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def init_page_pools(
    mesh: Mesh,
    *,
    num_layers: int,
    stored_heads: int,
    num_pages: int,
    page_size: int,
    head_dim: int,
    dtype: jnp.dtype,
) -> KVPools:
    """Zeroed pools placed straight onto the replica's devices (no host copy)."""
    sharding = kv_sharding(mesh, stored_heads, head_axis=0)
    shape = (stored_heads, num_pages, page_size, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(zeros(), zeros()) for _ in range(num_layers)]
