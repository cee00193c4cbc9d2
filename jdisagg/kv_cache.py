"""The paged KV cache: a host-side page allocator and the device page pools it hands out.

Pools are ``[kv_heads, pages, page_size, head_dim]`` per layer (the layout the paged-attention kernels read),
kv heads split over the replica's ``tp`` axis. Page 0 is a scratch page that is never handed out: padded
batch slots and padded prompt pages write there, so compiled programs need no masks on their writes.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.meshes import TP_AXIS

SCRATCH_PAGE = 0

KVPools = list[tuple[jax.Array, jax.Array]]  # per layer (k_pages, v_pages)


class OutOfPages(Exception):
    """Not enough free pages; the caller queues or preempts."""


class PageAllocator:
    """Free list of one decode replica's pages. Thread-safe: prefill reserves, decode grows and frees."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` pages or ``OutOfPages``; never a partial allocation."""
        with self._lock:
            if n > len(self._free):
                raise OutOfPages(f"need {n} pages, {len(self._free)} free")
            pages = [self._free.pop() for _ in range(n)]
        return pages

    def release(self, pages: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(pages))
            if len(self._free) > self.capacity:
                raise AssertionError("page released twice")


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


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
