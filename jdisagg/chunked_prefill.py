"""Prefill of prompts longer than the chunk length: chunk by chunk, and handed off as a sequence of pieces.

Why chunks: a dense prefill over T tokens materialises ``[heads, T, T]`` scores (tens of GB at 32k tokens)
and needs a program per prompt bucket up to the context. Here one program, ``prefill_chunk[C]``
(``jdisagg.programs``), runs each C-token chunk at its offset; it attends blockwise to the KV of the earlier
chunks, which live in a dense per-prompt buffer of the whole context. Memory is the buffer and the pieces
(both linear in the context) plus ``[heads, C, C]`` scores, never ``T x T``.

Why a buffer of the whole context, allocated per prompt: one shape, so one program serves every chunk of
every prompt (a buffer sized to the prompt would need a program per size), and the prefill replica must be
able to hold that much KV for the longest prompt anyway. It is zeroed by a compiled program on the devices
and dropped when the call returns, so short prompts never pay for it.

The hand-off (``ChunkedKV``) is the chunks' own KV, one ``[layers, C, kv_heads, head_dim]`` piece each: the
decode replica inserts them with its ``insert[C]`` program at their page offsets, so no insert program is
compiled per prompt length either. Across processes the pieces travel as one transfer-server offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.executors import CompileTask
from jdisagg.kv_cache import kv_sharding
from jdisagg.meshes import TP_AXIS
from jdisagg.programs import KVBuffer, compile_chunk_prefill, compile_kv_buffer

KVPiece = tuple[jax.Array, jax.Array]  # (k, v) ``[layers, tokens, kv_heads, head_dim]``


@dataclass(frozen=True)
class ChunkedKV:
    """The KV hand-off of a chunked prompt: one piece per chunk, in prompt order, padding at the end of the
    last one (as a bucketed prompt's)."""

    pieces: tuple[KVPiece, ...]


def kv_pieces(kv: KVPiece | ChunkedKV) -> tuple[KVPiece, ...]:
    """A hand-off as pieces in prompt order: a short prompt's (k, v) is one piece."""
    return kv.pieces if isinstance(kv, ChunkedKV) else (kv,)


def kv_nbytes(pieces: Sequence[KVPiece]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in pieces)


class ChunkedPrefill:
    """The long-prompt path of one prefill replica: its buffer and chunk programs, and running them."""

    def __init__(
        self, mesh: Mesh, graphdef: nnx.GraphDef, state: Any, *, chunk: int, capacity: int,
        kv_out: NamedSharding,
    ) -> None:
        config = nnx.merge(graphdef, state).config
        tp = mesh.shape[TP_AXIS]
        heads = config.num_kv_heads
        sharding = kv_sharding(mesh, heads if heads % tp == 0 else 1, head_axis=1)
        dtype = jax.tree.leaves(state)[0].dtype  # the hand-off's dtype: the model's
        entry = jax.ShapeDtypeStruct((capacity, heads, config.head_dim), dtype, sharding=sharding)
        self.chunk, self.mesh = chunk, mesh
        self._graphdef, self._state, self._kv_out = graphdef, state, kv_out
        self._buffer: KVBuffer = [(entry, entry) for _ in range(config.num_layers)]
        self._run: jax.stages.Compiled | None = None
        self._new_buffer: jax.stages.Compiled | None = None

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def chunk_program() -> None:
            self._run = compile_chunk_prefill(self._graphdef, self._state, self.mesh, self.chunk,
                                              self._buffer, self._kv_out)

        def buffer_program() -> None:
            self._new_buffer = compile_kv_buffer(self._buffer)

        capacity = self._buffer[0][0].shape[0]
        return [(f"prefill_chunk[{owner}] len {self.chunk}", chunk_program),
                (f"kv_buffer[{owner}] {capacity} tokens", buffer_program)]

    def __call__(self, token_ids: Sequence[int]) -> tuple[jax.Array, ChunkedKV]:
        """Dispatch every chunk of ``token_ids`` (asynchronously): the logits after the prompt ``[1, V]``
        and its KV pieces, one per chunk. ``token_ids`` must be longer than one chunk."""
        return self._prefill_from(token_ids, self._new_buffer(), [])

    def _prefill_from(
        self, token_ids: Sequence[int], buffer: KVBuffer, done: Sequence[KVPiece]
    ) -> tuple[jax.Array, ChunkedKV]:
        """Dispatch the chunks after the first ``len(done)``, whose pieces ``done`` are already in
        ``buffer`` (a prefix cache's hit; none otherwise); the hand-off holds ``done`` and the new pieces."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        tokens = np.zeros((-(-len(token_ids) // self.chunk) * self.chunk,), np.int32)
        tokens[: len(token_ids)] = token_ids
        length = jax.device_put(np.int32(len(token_ids)), replicated)
        pieces = list(done)
        for start in range(len(done) * self.chunk, len(token_ids), self.chunk):
            chunk = jax.device_put(tokens[None, start : start + self.chunk], replicated)
            start_at = jax.device_put(np.int32(start), replicated)
            logits, k, v, buffer = self._run(self._state, buffer, chunk, start_at, length)
            pieces.append((k, v))
        return logits, ChunkedKV(tuple(pieces))
