"""The prefill replica's own prefix cache: the KV of prompts' leading full chunks, kept on the prefill mesh,
so a later prompt that shares them is prefilled only from its first uncached chunk.

Why: the decode replicas' prefix cache (``jdisagg.prefix_cache``) saves the hand-off of a prefix they hold,
but the prefill mesh kept no KV between prompts, so a prompt shipped there was computed whole. Here each
prefill replica keeps, within a byte budget, the pieces ``prefill_chunk`` returned for full chunks; a long
prompt whose leading chunks are cached gets them written back into its buffer (``kv_seed``) and runs the
chunk program only from the first uncached chunk. Its hand-off is the same ``ChunkedKV`` as without the
cache (cached pieces first, bit for bit what the program would compute again), so the cut to what the decode
replica lacks (``jdisagg.kv_suffix``, from the decode side's ``cached_tokens``) is unchanged: the two caches
are independent, and either may hold more of a prompt than the other.

Why chunks, not pages: ``prefill_chunk`` runs whole chunks at multiples of the chunk length (one program
over a buffer of whole chunks), so only a hit rounded down to a chunk boundary saves compute, and a chunk's
piece is exactly what such a hit must restore. A prompt of at most one chunk (one bucketed program, nothing
before it to reuse) is neither looked up nor cached; the chunk holding a prompt's last token is always
computed (its logits give the first token).

Keys: the chained page key (``prefix_cache.extend_page_keys``) of a chunk's last page, which stands for
every token up to the chunk's end, as the chunk's KV depends on all of them. Eviction: least recently used
first; a prompt's chunks are touched last chunk first, so a shared leading chunk outlives the ones after it
(a chunk is useless without those before it). Memory: the pieces stay where the chunk program left them, in
the hand-off sharding on the prefill mesh's devices (no copy); the budget counts their bytes.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.chunked_prefill import ChunkedKV, ChunkedPrefill, KVPiece, kv_nbytes
from jdisagg.executors import CompileTask
from jdisagg.prefix_cache import PageKey, extend_page_keys
from jdisagg.programs import compile_kv_seed


def default_cache_bytes(context_tokens: int, layers: int, kv_heads: int, head_dim: int, dtype: Any) -> int:
    """One full context of KV (k and v): the default budget. The prefill mesh already holds that much for the
    buffer of every long prompt it runs, so the cache at most doubles its peak KV; and one context's worth
    holds the leading chunks of the longest prompt, or of several prompts that share a long prefix."""
    return 2 * context_tokens * layers * kv_heads * head_dim * np.dtype(dtype).itemsize


class ChunkCache:
    """Chunk pieces by key, least recently used first, within ``budget_bytes``; host bookkeeping only."""

    def __init__(self, budget_bytes: int, chunk: int, page_size: int) -> None:
        if budget_bytes < 0 or chunk % page_size:
            raise ValueError(f"want budget_bytes >= 0 and chunk={chunk} a multiple of page_size={page_size}")
        self.budget_bytes, self.chunk, self.page_size = budget_bytes, chunk, page_size
        self._pieces: collections.OrderedDict[PageKey, KVPiece] = collections.OrderedDict()
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens whose KV came from here instead of the chunk program
        self.evictions = 0  # chunks dropped to stay within the budget

    @property
    def chunks(self) -> int:
        return len(self._pieces)

    def keys(self, token_ids: Sequence[int]) -> list[PageKey]:
        """The key of each full chunk of ``token_ids``: the chained key of its last page."""
        pages = extend_page_keys([], token_ids, self.page_size)
        per_chunk = self.chunk // self.page_size
        return pages[per_chunk - 1 :: per_chunk]

    def lookup(self, keys: Sequence[PageKey]) -> list[KVPiece]:
        """The pieces of the longest run of ``keys``, from the first, that the cache holds (now the most
        recently used)."""
        hits = []
        for key in keys:
            piece = self._pieces.get(key)
            if piece is None:
                break
            hits.append(piece)
        self._touch(keys[: len(hits)])
        self.hit_tokens += len(hits) * self.chunk
        return hits

    def store(self, keys: Sequence[PageKey], pieces: Sequence[KVPiece]) -> None:
        """Cache the leading chunks ``pieces`` (one per key) that the budget can hold, evicting the least
        recently used others as needed."""
        if not pieces:
            return
        fits = self.budget_bytes // kv_nbytes(pieces[:1])  # every piece has a chunk's shape
        keys = keys[:fits]
        for key, piece in zip(keys, pieces, strict=False):
            if key not in self._pieces:
                self._pieces[key] = piece
                self.bytes += kv_nbytes([piece])
        self._touch(keys)
        while self.bytes > self.budget_bytes:
            _, piece = self._pieces.popitem(last=False)
            self.bytes -= kv_nbytes([piece])
            self.evictions += 1

    def _touch(self, keys: Sequence[PageKey]) -> None:
        for key in reversed(keys):  # the first chunk ends up the most recently used
            self._pieces.move_to_end(key)


class CachedChunkedPrefill(ChunkedPrefill):
    """The long-prompt path with a ``ChunkCache``: cached leading chunks are written into the buffer by
    ``kv_seed`` (one program more), and ``prefill_chunk`` runs from the first uncached one."""

    def __init__(
        self, mesh: Mesh, graphdef: nnx.GraphDef, state: Any, *, chunk: int, capacity: int,
        kv_out: NamedSharding, cache: ChunkCache,
    ) -> None:
        super().__init__(mesh, graphdef, state, chunk=chunk, capacity=capacity, kv_out=kv_out)
        if cache.chunk != chunk:
            raise ValueError(f"the cache's chunk {cache.chunk} is not the prefill chunk {chunk}")
        self.cache = cache
        entry = self._buffer[0][0]  # [capacity, kv_heads, head_dim]
        self._piece = jax.ShapeDtypeStruct((len(self._buffer), chunk, *entry.shape[1:]), entry.dtype,
                                           sharding=kv_out)
        self._seed: jax.stages.Compiled | None = None

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def seed_program() -> None:
            self._seed = compile_kv_seed(self._buffer, self._piece, self.mesh)

        return super().compile_tasks(owner) + [(f"kv_seed[{owner}] len {self.chunk}", seed_program)]

    def __call__(self, token_ids: Sequence[int]) -> tuple[jax.Array, ChunkedKV]:
        """As ``ChunkedPrefill``'s, reusing the cached leading chunks and caching the prompt's full ones."""
        keys = self.cache.keys(token_ids)
        cached = self.cache.lookup(keys[: (len(token_ids) - 1) // self.chunk])
        replicated = NamedSharding(self.mesh, PartitionSpec())
        buffer = self._new_buffer()
        for i, (k, v) in enumerate(cached):  # cached chunks go back where prefill_chunk wrote them
            buffer = self._seed(buffer, k, v, jax.device_put(np.int32(i * self.chunk), replicated))
        logits, kv = self._prefill_from(token_ids, buffer, cached)
        self.cache.store(keys, kv.pieces[: len(keys)])
        return logits, kv
