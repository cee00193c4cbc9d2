"""The suffix-only hand-off: a prompt whose first ``cached`` tokens' KV the decode replica already holds
ships only the KV of the rest.

The prefill mesh computes the prompt from where its own cache ends (``jdisagg.prefill_cache``: whole
chunks of long prompts; otherwise the whole prompt); what changes here is what moves: the KV of
positions ``cached .. len - 1``, so the bytes transferred follow the uncached suffix. ``cached`` is a
multiple of the page size, so the suffix starts at a page boundary and the decode replica
inserts it into the prompt's pages from ``cached // page_size`` on with its usual insert programs.

Shapes stay bounded: a short prompt's suffix is cut to the bucket of its length (``kv_window[T, S]`` for
the prompt's bucket T and the suffix's S), and a chunked prompt's suffix is re-cut into pieces of one chunk
starting at ``cached`` (each out of the two chunk pieces it straddles), the last one to the bucket of what
is left. Padding is only ever at the end of the last piece, as ``insert`` expects. The cuts are planned in
plain Python (``plan_cuts``), and only the window shapes some prompt can need are compiled
(``window_signatures``): at least one page is cached, so a suffix is always shorter than its prompt's
bucket by a page, which rules out the pairs with a small T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.buckets import bucket_for
from jdisagg.chunked_prefill import ChunkedKV, KVPiece
from jdisagg.executors import CompileTask
from jdisagg.programs import compile_kv_window

Signature = tuple[int, int, int]  # a kv_window program: (parts, tokens per part, window size)


@dataclass(frozen=True)
class Cut:
    """One piece of a suffix hand-off: piece ``first`` of the hand-off as it is (``signature`` None), or a
    window of ``signature[2]`` tokens from ``offset`` over ``signature[0]`` pieces starting at ``first``."""

    first: int
    offset: int
    signature: Signature | None


def plan_cuts(length: int, cached: int, buckets: tuple[int, ...]) -> list[Cut]:
    """How the hand-off of a ``length``-token prompt is cut to positions ``cached ..``; a prompt longer than
    the largest bucket (the chunk) has one piece per chunk."""
    chunk = buckets[-1]
    if length <= chunk:
        return [Cut(0, cached, (1, bucket_for(length, buckets), bucket_for(length - cached, buckets)))]
    cuts = []
    for start in range(cached, length, chunk):
        index, offset = divmod(start, chunk)
        size = bucket_for(min(chunk, length - start), buckets)
        if offset == 0 and size == chunk:
            cuts.append(Cut(index, 0, None))
        else:
            cuts.append(Cut(index, offset, (2 if offset + size > chunk else 1, chunk, size)))
    return cuts


def window_signatures(buckets: tuple[int, ...], page_size: int, chunked: bool) -> list[Signature]:
    """Every kv_window shape ``plan_cuts`` can ask for when ``cached`` is a positive multiple of
    ``page_size`` below the prompt's length (tests/test_kv_suffix.py enumerates the prompts to check it).

    One part of bucket T: the suffix has at most T - page_size tokens, so its bucket S is at most that
    length's bucket (none when T is a single page). Two chunk pieces: a window starts at least a page
    before the end of the first, so it straddles both only when S is longer than a page."""
    one = [(1, t, s) for t in buckets if t > page_size for s in buckets if s <= bucket_for(t - page_size,
                                                                                           buckets)]
    chunk = buckets[-1]
    return one + ([(2, chunk, s) for s in buckets if s > page_size] if chunked else [])


class SuffixCutter:
    """The ``kv_window`` programs of one prefill replica, and cutting a hand-off down to its suffix."""

    def __init__(
        self, mesh: Mesh, kv_out: NamedSharding, *, layers: int, kv_heads: int, head_dim: int, dtype: Any,
        buckets: tuple[int, ...], chunked: bool, page_size: int,
    ) -> None:
        self.mesh, self.buckets, self.chunked, self.page_size = mesh, buckets, chunked, page_size
        self._part = lambda tokens: jax.ShapeDtypeStruct((layers, tokens, kv_heads, head_dim), dtype,
                                                         sharding=kv_out)
        self._compiled: dict[Signature, jax.stages.Compiled] = {}

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def task(signature: Signature) -> Callable[[], None]:
            def run() -> None:
                parts, tokens, size = signature
                self._compiled[signature] = compile_kv_window(self._part(tokens), parts, size, self.mesh)

            return run

        signatures = window_signatures(self.buckets, self.page_size, self.chunked)
        return [(f"kv_window[{owner}] {p}x{t} -> {s}", task((p, t, s))) for p, t, s in signatures]

    def check(self, length: int, cached: int) -> None:
        """Refuse a cached prefix that cannot be cut off (``ValueError`` with the numbers)."""
        if cached < 0 or cached % self.page_size or cached >= length:
            raise ValueError(f"cached_tokens={cached} must be a multiple of page_size={self.page_size} below "
                             f"the prompt's {length} tokens")

    def __call__(self, kv: KVPiece | ChunkedKV, length: int, cached: int) -> KVPiece | ChunkedKV:
        """The hand-off of a ``length``-token prompt cut to positions ``cached ..`` (dispatched)."""
        pieces = kv.pieces if isinstance(kv, ChunkedKV) else (kv,)
        suffix = []
        for cut in plan_cuts(length, cached, self.buckets):
            if cut.signature is None:
                suffix.append(pieces[cut.first])
                continue
            parts = pieces[cut.first : cut.first + cut.signature[0]]
            program = self._compiled[cut.signature]
            offset = jax.device_put(np.int32(cut.offset), NamedSharding(self.mesh, PartitionSpec()))
            suffix.append(program(offset, tuple(k for k, _ in parts), tuple(v for _, v in parts)))
        return ChunkedKV(tuple(suffix)) if isinstance(kv, ChunkedKV) else suffix[0]
