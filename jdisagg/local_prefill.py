"""Prefill on the decode replica itself: prompt chunks that attend to KV already in its pages.

Why here and not on the prefill mesh: a prompt whose prefix is cached in a decode replica's pages only needs
its suffix computed, and the prefill mesh holds at most the whole chunks its own cache kept
(``jdisagg.prefill_cache``); a short suffix is cheaper to compute
next to its KV than to prefill and hand off (conditional disaggregation), and in colocated mode the same
chunks interleave with decode steps (chunked prefill). The scheduler decides which prompts run here and
cuts them into ``LocalChunk``s; this module runs them.

One program shape per call size and chunk length: ``prefill_local[N, C]`` (``jdisagg.programs``) for
chunks of at most C tokens, padded, with a page table as wide as the context, for N = 1 and N = ``batch``
chunks per call and C in ``chunk_lengths`` (the longest chunk and its halves down to 16 tokens). Why
several lengths: on a compute-bound device a padding token costs what a real one does, and a 20-token chat
prompt padded to a 256-token chunk made colocated chunked prefill 3x slower than no chunking at all
(docs/benchmarks.md). Keys are read in blocks of the longest chunk whatever C is, so every length shares
one page-table width. The attention loop visits only the key blocks a chunk can see (a dynamic trip
count), so a chunk at the start of a sequence costs one block, not the context. Chunks of one length share
a call of N rows only when at least half its rows are real (``MAX_BATCH_PADDING``, as batched prefill);
otherwise they run one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdisagg.buckets import MAX_BATCH_PADDING, bucket_for
from jdisagg.executors import CompileTask, LocalChunk, Sampled
from jdisagg.kv_cache import KVPools
from jdisagg.kv_manager import SCRATCH_PAGE
from jdisagg.placement import put_replicated
from jdisagg.programs import compile_local_prefill
from jdisagg.sizes import ServingSizes

DEFAULT_LOCAL_CHUNK = 256  # tokens per local chunk unless the prefill chunk is smaller
DEFAULT_LOCAL_BATCH = 4  # chunks per prefill_local call (the largest decode batch bucket up to this)
SHORTEST_LOCAL_CHUNK = 16  # tokens; chunk lengths are the longest and its halves down to this


def local_shape(sizes: ServingSizes) -> tuple[int, int]:
    """(chunks per call, tokens per chunk) of a decode replica's local prefill programs: the prefill chunk
    up to ``DEFAULT_LOCAL_CHUNK`` tokens (or one page, if pages are larger), and the largest decode batch
    bucket up to ``DEFAULT_LOCAL_BATCH`` (the sampler is compiled for those). ``memory.decode_workspace``
    measures the program at this shape."""
    batch = max(b for b in sizes.batch_buckets if b <= DEFAULT_LOCAL_BATCH)
    return batch, min(sizes.chunk, max(DEFAULT_LOCAL_CHUNK, sizes.page_size))


def chunk_lengths(longest: int) -> tuple[int, ...]:
    """The chunk lengths local prefill compiles for, shortest first: ``longest`` and its halves while they
    stay whole and at least ``SHORTEST_LOCAL_CHUNK`` tokens (256 -> 16, 32, 64, 128, 256): a chunk computes
    at most 2x its tokens, as a bucketed prompt does (quarters would halve the programs but pad a 128-token
    prompt to 256)."""
    lengths = [longest]
    while lengths[-1] % 2 == 0 and lengths[-1] // 2 >= SHORTEST_LOCAL_CHUNK:
        lengths.append(lengths[-1] // 2)
    return tuple(reversed(lengths))


class LocalPrefill:
    """The ``prefill_local`` programs of one decode replica, and running chunks through them."""

    def __init__(
        self, mesh: Mesh, graphdef: nnx.GraphDef, state: Any, *, chunk: int, batch: int, page_size: int,
        max_pages: int, stored_heads: int, sample: Callable[..., Sampled],
    ) -> None:
        if chunk < page_size or chunk % page_size:
            raise ValueError(f"local chunk {chunk} must be a positive multiple of page_size={page_size}")
        self.chunk, self.batch, self.page_size, self.max_pages = chunk, batch, page_size, max_pages
        self.mesh, self._graphdef, self._state = mesh, graphdef, state
        self._stored_heads, self._sample = stored_heads, sample
        self.lengths = chunk_lengths(chunk)
        blocks = chunk // page_size  # pages per key block (of the longest chunk): the table is read in blocks
        self.table_width = -(-max_pages // blocks) * blocks
        self._compiled: dict[tuple[int, int], jax.stages.Compiled] = {}  # (rows, length) -> program

    @property
    def call_sizes(self) -> tuple[int, ...]:
        return (1, self.batch) if self.batch > 1 else (1,)

    def compile_tasks(self, owner: str, pools: Callable[[], KVPools]) -> list[CompileTask]:
        """One task per call size and chunk length; ``pools`` gives the replica's pools (their shapes and
        shardings)."""

        def task(batch: int, length: int) -> Callable[[], None]:
            def run() -> None:
                self._compiled[batch, length] = compile_local_prefill(
                    self._graphdef, self._state, pools(), self.mesh, batch, length, self.table_width,
                    self.page_size, self._stored_heads, self.chunk // self.page_size,
                )

            return run

        return [(f"prefill_local[{owner}] batch {n} len {length}", task(n, length))
                for length in self.lengths for n in self.call_sizes]

    def check(self, chunk: LocalChunk) -> None:
        """Refuse a chunk the programs cannot run (``ValueError`` naming what is wrong)."""
        n, end = len(chunk.token_ids), chunk.start + len(chunk.token_ids)
        if not 0 < n <= self.chunk:
            raise ValueError(f"a local chunk holds 1 to {self.chunk} tokens, got {n}")
        if chunk.start < 0:
            raise ValueError(f"a local chunk cannot start at position {chunk.start}")
        if len(chunk.pages) > self.max_pages or len(chunk.pages) * self.page_size < end:
            raise ValueError(f"{len(chunk.pages)} pages of {self.page_size} tokens cannot hold positions up "
                             f"to {end} (at most {self.max_pages} pages per sequence)")
        if SCRATCH_PAGE in chunk.pages[: -(-end // self.page_size)]:
            raise ValueError(f"page {SCRATCH_PAGE} is the scratch page, never a sequence's")

    def __call__(
        self, pools: KVPools, chunks: Sequence[LocalChunk]
    ) -> tuple[KVPools, list[tuple[list[int], Sampled]]]:
        """Dispatch every chunk (asynchronously, after checking them all), grouped by chunk length: the new
        pools and, per program call, the indices in ``chunks`` of its real rows (its first rows) and its
        sampled rows on device. Chunks of one call must belong to different sequences: a chunk sees only
        the KV written before its call."""
        for chunk in chunks:
            self.check(chunk)
        firsts = [chunk.pages[chunk.start // self.page_size] for chunk in chunks]
        if len(set(firsts)) < len(firsts):
            raise ValueError("two chunks of one prefill_local call write into the same page: chunks of one "
                             "sequence must run in calls of their own, in order")
        sampled = []
        for length in self.lengths:
            rest = [i for i, c in enumerate(chunks) if bucket_for(len(c.token_ids), self.lengths) == length]
            while rest:
                rows = self.batch if self.batch > 1 and self.batch <= MAX_BATCH_PADDING * len(rest) else 1
                group, rest = rest[:rows], rest[rows:]
                pools, out = self._run(pools, [chunks[i] for i in group], rows, length)
                sampled.append((group, out))
        return pools, sampled

    def _run(
        self, pools: KVPools, chunks: Sequence[LocalChunk], rows: int, length: int
    ) -> tuple[KVPools, Sampled]:
        # One host array per call: tokens | start | length | page table (programs.packed_local_prefill_fn).
        # Padding rows: no real token (length 0), every page the scratch page.
        inputs = np.zeros((rows, length + 2 + self.table_width), np.int32)
        inputs[:, length + 2 :] = SCRATCH_PAGE
        for row, chunk in enumerate(chunks):
            inputs[row, : len(chunk.token_ids)] = chunk.token_ids
            inputs[row, length], inputs[row, length + 1] = chunk.start, len(chunk.token_ids)
            inputs[row, length + 2 : length + 2 + len(chunk.pages)] = chunk.pages
        call_inputs = put_replicated(self.mesh, inputs)
        logits, pools, positions = self._compiled[rows, length](self._state, pools, call_inputs)
        sampled = self._sample(logits, [c.sampling for c in chunks], positions, [c.forced for c in chunks])
        return pools, sampled
