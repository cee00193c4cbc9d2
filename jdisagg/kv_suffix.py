"""The suffix-only hand-off: a prompt whose first ``cached`` tokens' KV the decode replica already holds
ships only the KV of the rest.

The prefill mesh has no copy of the cached prefix, so it still prefills the whole prompt; what changes is
what moves: the KV of positions ``cached .. len - 1``, so the bytes transferred follow the uncached suffix.
``cached`` is a multiple of the page size, so the suffix starts at a page boundary and the decode replica
inserts it into the prompt's pages from ``cached // page_size`` on with its usual insert programs.

Shapes stay bounded: a short prompt's suffix is cut to the bucket of its length (``kv_window[T, S]`` for
the prompt's bucket T and the suffix's S), and a chunked prompt's suffix is re-cut into pieces of one chunk
starting at ``cached`` (each out of the two chunk pieces it straddles), the last one to the bucket of what
is left. Padding is only ever at the end of the last piece, as ``insert`` expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.buckets import bucket_for
from jdisagg.chunked_prefill import ChunkedKV, KVPiece
from jdisagg.executors import CompileTask
from jdisagg.programs import compile_kv_window


class SuffixCutter:
    """The ``kv_window`` programs of one prefill replica, and cutting a hand-off down to its suffix."""

    def __init__(
        self, mesh: Mesh, kv_out: NamedSharding, *, layers: int, kv_heads: int, head_dim: int, dtype: Any,
        buckets: tuple[int, ...], chunked: bool, page_size: int,
    ) -> None:
        self.mesh, self.buckets, self.chunked, self.page_size = mesh, buckets, chunked, page_size
        self._part = lambda tokens: jax.ShapeDtypeStruct((layers, tokens, kv_heads, head_dim), dtype,
                                                         sharding=kv_out)
        self._compiled: dict[tuple[int, int, int], jax.stages.Compiled] = {}  # by (parts, part tokens, size)

    def _signatures(self) -> list[tuple[int, int, int]]:
        """(parts, tokens per part, window size): a short prompt's suffix of any bucket up to its own; with
        chunking, a window over two chunk pieces."""
        one = [(1, t, s) for t in self.buckets for s in self.buckets if s <= t]
        chunk = self.buckets[-1]
        return one + ([(2, chunk, s) for s in self.buckets] if self.chunked else [])

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def task(signature: tuple[int, int, int]) -> Callable[[], None]:
            def run() -> None:
                parts, tokens, size = signature
                self._compiled[signature] = compile_kv_window(self._part(tokens), parts, size, self.mesh)

            return run

        return [(f"kv_window[{owner}] {p}x{t} -> {s}", task((p, t, s))) for p, t, s in self._signatures()]

    def check(self, length: int, cached: int) -> None:
        """Refuse a cached prefix that cannot be cut off (``ValueError`` with the numbers)."""
        if cached < 0 or cached % self.page_size or cached >= length:
            raise ValueError(f"cached_tokens={cached} must be a multiple of page_size={self.page_size} below "
                             f"the prompt's {length} tokens")

    def __call__(self, kv: KVPiece | ChunkedKV, length: int, cached: int) -> KVPiece | ChunkedKV:
        """The hand-off of a ``length``-token prompt cut to positions ``cached ..`` (dispatched)."""
        if not isinstance(kv, ChunkedKV):
            k, v = kv
            return self._window((k,), (v,), cached, bucket_for(length - cached, self.buckets))
        pieces, chunk = kv.pieces, self.buckets[-1]
        suffix = []
        for start in range(cached, length, chunk):
            index, offset = divmod(start, chunk)
            size = bucket_for(min(chunk, length - start), self.buckets)
            if offset == 0 and size == chunk:
                suffix.append(pieces[index])
                continue
            parts = pieces[index : index + 2] if offset + size > chunk else pieces[index : index + 1]
            suffix.append(self._window(tuple(k for k, _ in parts), tuple(v for _, v in parts), offset, size))
        return ChunkedKV(tuple(suffix))

    def _window(self, ks: tuple, vs: tuple, offset: int, size: int) -> KVPiece:
        program = self._compiled[len(ks), ks[0].shape[1], size]
        return program(jax.device_put(np.int32(offset), NamedSharding(self.mesh, PartitionSpec())), ks, vs)
