"""Device-side state of one replica: its params, page pools and compiled programs.

A replica object is used by exactly one engine thread (prefill replicas by the prefill thread, a decode
replica by its own decode thread, ``receive`` by the transfer thread), so nothing here locks. Which page
holds what is the scheduler's business (``jdisagg.kv_manager``); a decode replica only has the pools.

This module holds the decode replica; the prefill replica lives in ``jdisagg.prefill_replica`` and the parts
both use in ``jdisagg.placement`` and ``jdisagg.sampler``, all importable from here as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdisagg.buckets import bucket_for
from jdisagg.chunked_prefill import kv_nbytes, kv_pieces
from jdisagg.executors import CompileTask, LocalChunk, Sampled, SamplingRow
from jdisagg.kv_cache import init_page_pools
from jdisagg.kv_manager import SCRATCH_PAGE
from jdisagg.local_prefill import LocalPrefill, local_shape
from jdisagg.meshes import PHASE_RULES, TP_AXIS, stored_kv_heads
from jdisagg.placement import ModelShape, handoff_sharding, model_shape, place_params
from jdisagg.placement import put_replicated as _put
from jdisagg.prefill_replica import PrefillReplica, build_prefill_replica
from jdisagg.programs import compile_decode, compile_insert
from jdisagg.sampler import Sampler
from jdisagg.sizes import ServingSizes

__all__ = [
    "DecodeReplica", "InFlightChunks", "InFlightStep", "ModelShape", "PrefillReplica", "Sampler",
    "build_decode_replica", "build_prefill_replica", "handoff_sharding", "model_shape", "place_params",
]


def _start_host_copies(sampled: Sampled) -> None:
    """Queue the device-to-host copies of a dispatched step's outputs behind it, so they have landed by
    the time the host reads them one step later; read one by one on demand, each is a blocking round trip
    of its own (on the H200 the reads were a third of the decode thread's time at batch 8)."""
    for array in sampled:
        array.copy_to_host_async()


@dataclass(frozen=True)
class InFlightStep:
    """A dispatched decode step: its sampled rows, still on device (the first ``rows`` are real)."""

    rows: int
    sampled: Sampled

    def __post_init__(self) -> None:
        _start_host_copies(self.sampled)

    def host(self) -> Sampled:
        return Sampled(*(x[: self.rows] for x in jax.device_get(self.sampled)))


@dataclass(frozen=True)
class InFlightChunks:
    """Dispatched local-prefill calls: per call, the indices of its real rows among the chunks given (its
    first rows) and its sampled rows, still on device. Calls run grouped by chunk length, so ``host``
    puts the rows back in the order the chunks were given."""

    calls: list[tuple[list[int], Sampled]]

    def __post_init__(self) -> None:
        for _, sampled in self.calls:
            _start_host_copies(sampled)

    def host(self) -> Sampled:
        rows = [[x[: len(indices)] for x in jax.device_get(sampled)] for indices, sampled in self.calls]
        order = np.argsort(np.concatenate([indices for indices, _ in self.calls]))
        return Sampled(*(np.concatenate(column)[order] for column in zip(*rows, strict=True)))


class DecodeReplica:
    """One decode replica: TP sub-mesh, its page pools, insert and decode programs."""

    alive = True

    def __init__(
        self,
        index: int,
        mesh: Mesh,
        graphdef: nnx.GraphDef,
        state: Any,
        shape: ModelShape,
        *,
        num_pages: int,
        page_size: int,
        prefill_buckets: tuple[int, ...],
        batch_buckets: tuple[int, ...],
        page_buckets: tuple[int, ...],
        attention_backend: str | None,
        kv_dtype: jnp.dtype,
        local_chunk: int = 0,
        local_batch: int = 1,
    ) -> None:
        self.index, self.mesh = index, mesh
        self.page_size = page_size
        self.prefill_buckets, self.batch_buckets = prefill_buckets, batch_buckets
        self.page_buckets = page_buckets
        self.num_pages = num_pages
        self._graphdef, self._state, self._shape = graphdef, state, shape
        self._backend, self._kv_dtype = attention_backend, kv_dtype
        self.stored_heads = stored_kv_heads(shape.num_kv_heads, mesh.shape[TP_AXIS])
        self.kv_sharding = handoff_sharding(mesh, shape.num_kv_heads)
        self.pools = self._new_pools()
        self._insert: dict[int, jax.stages.Compiled] = {}
        self._decode: dict[tuple[int, int], jax.stages.Compiled] = {}  # by (batch, page-table width)
        self._sample = Sampler(mesh, shape.vocab_size, batch_buckets)
        # The last step's successor inputs (positions + 1), on device and as the host would build them.
        self._next_inputs: jax.Array | None = None
        self._next_host_inputs: np.ndarray | None = None
        self._next_rows = 0
        self.local_chunk = local_chunk  # 0: no prefill_local programs
        self._local = LocalPrefill(
            mesh, graphdef, state, chunk=local_chunk, batch=local_batch, page_size=page_size,
            max_pages=page_buckets[-1], stored_heads=self.stored_heads, sample=self._sample,
        ) if local_chunk else None

    def _new_pools(self):
        s = self._shape
        return init_page_pools(
            self.mesh,
            num_layers=s.num_layers,
            stored_heads=self.stored_heads,
            num_pages=self.num_pages,
            page_size=self.page_size,
            head_dim=s.head_dim,
            dtype=self._kv_dtype,
        )

    def reset_pools(self) -> None:
        """Fresh pools after a failed program (a failed call may have consumed the donated buffers)."""
        self.pools = self._new_pools()
        self._next_host_inputs = None

    def compile_tasks(self) -> list[CompileTask]:
        s = self._shape

        def insert_task(length: int) -> Callable[[], None]:
            def run() -> None:
                kv = jax.ShapeDtypeStruct(
                    (s.num_layers, length, s.num_kv_heads, s.head_dim),
                    jax.tree.leaves(self._state)[0].dtype,  # prefill hands KV over in the model's dtype
                    sharding=self.kv_sharding,
                )
                self._insert[length] = compile_insert(
                    self.pools, kv, self.page_size, self.stored_heads, self.mesh
                )

            return run

        def decode_task(batch: int, width: int) -> Callable[[], None]:
            def run() -> None:
                self._decode[batch, width] = compile_decode(
                    self._graphdef,
                    self._state,
                    self.pools,
                    self.mesh,
                    batch,
                    width,
                    self.page_size,
                    self.stored_heads,
                    s.head_dim**-0.5,
                    self._backend,
                )

            return run

        return [(f"insert[{self.index}] len {n}", insert_task(n)) for n in self.prefill_buckets] + [
            (f"decode[{self.index}] batch {b} pages {w}", decode_task(b, w))
            for b in self.batch_buckets
            for w in self.page_buckets
        ] + self._local_compile_tasks() + self._sample.compile_tasks(f"decode {self.index}")

    def _local_compile_tasks(self) -> list[CompileTask]:
        if self._local is None:
            return []
        return self._local.compile_tasks(str(self.index), lambda: self.pools)

    def receive(self, kv: Any) -> tuple[tuple[tuple[jax.Array, jax.Array], ...], int]:
        """The KV hand-off: move prefill's KV (a (k, v) pair, or a chunked prompt's pieces) onto this
        replica, resharded to its kv-head split. Blocks until it has arrived; returns it as pieces in prompt
        order and the bytes moved."""
        pieces = jax.block_until_ready(jax.device_put(kv_pieces(kv), self.kv_sharding))
        return pieces, kv_nbytes(pieces)

    def discard(self, pieces: Sequence[tuple[jax.Array, jax.Array]]) -> None:
        """Drop a received KV that will not be inserted (its request ended meanwhile); nothing to do here."""

    def insert(self, pieces: Sequence[tuple[jax.Array, jax.Array]], pages: Sequence[int]) -> None:
        """Write received pieces into ``pages`` (the prompt's, in order), each with the insert program of
        its length at its page offset; pages past the prompt's go to the scratch page."""
        offset = 0
        for k, v in pieces:
            length = k.shape[1]
            ids = np.full((length // self.page_size,), SCRATCH_PAGE, np.int32)
            own = pages[offset : offset + len(ids)]
            ids[: len(own)] = own
            self.pools = self._insert[length](self.pools, k, v, _put(self.mesh, ids))
            offset += len(ids)

    def prefill_local(self, chunks: Sequence[LocalChunk]) -> InFlightChunks:
        """Queue ``chunks`` here (``jdisagg.local_prefill``) and return at once: each chunk's KV is written
        into its pages and the token after its last one sampled (``collect`` reads them, in order).
        Chunks of one call belong to different sequences."""
        if self._local is None:
            raise ValueError(f"decode replica {self.index} has no local prefill programs (local_chunk is 0)")
        self.pools, calls = self._local(self.pools, chunks)
        return InFlightChunks(calls)

    overlaps = True  # dispatch returns before the step has run: the engine may queue the next one behind it

    def dispatch(
        self,
        tokens: Sequence[int] | InFlightStep,
        positions: Sequence[int],
        pages: Sequence[Sequence[int]],
        sampling: Sequence[SamplingRow],
        forced: Sequence[int],
    ) -> InFlightStep:
        """Queue one decode step (and its sampling) for ``len(positions)`` sequences and return at once.

        ``tokens`` are the host ids of each row's last token, or a step still in flight for the same rows in
        the same order: its sampled tokens then feed this step on device, without a trip to the host.
        """
        n = len(positions)
        batch = bucket_for(n, self.batch_buckets)
        width = bucket_for(max(len(p) for p in pages), self.page_buckets)
        # positions | page table; padding rows: position 0, every page the scratch page
        step_inputs = np.full((batch, 1 + width), SCRATCH_PAGE, np.int32)
        step_inputs[:, 0] = 0
        step_inputs[:n, 0] = positions
        for row, seq_pages in enumerate(pages):
            step_inputs[row, 1 : 1 + len(seq_pages)] = seq_pages
        if isinstance(tokens, InFlightStep):
            tok = tokens.sampled.tokens
        else:
            tok = np.zeros((batch,), np.int32)
            tok[:n] = tokens
            tok = _put(self.mesh, tok)
        logits, self.pools, next_positions, self._next_inputs = self._decode[batch, width](
            self._state, self.pools, tok, self._upload_step_inputs(step_inputs, n)
        )
        # What self._next_inputs holds once the step has run. A copy: on a CPU the upload may alias
        # step_inputs, which the step reads after this returns.
        successor = step_inputs.copy()
        successor[:, 0] += 1
        self._next_host_inputs, self._next_rows = successor, n
        return InFlightStep(n, self._sample(logits, sampling, next_positions, forced))

    def _upload_step_inputs(self, step_inputs: np.ndarray, rows: int) -> jax.Array:
        """``step_inputs`` on device: the previous step's successor (already there) when the real rows
        match it, the steady state between page crossings, else a fresh upload. Padding rows are not
        compared: on device they advance a position per step, within the real rows' tables (they start
        at 0, below every real row), over scratch pages, and their outputs are dropped."""
        ahead = self._next_host_inputs
        if (
            ahead is not None
            and rows == self._next_rows
            and ahead.shape == step_inputs.shape
            and np.array_equal(ahead[:rows], step_inputs[:rows])
        ):
            return self._next_inputs
        return _put(self.mesh, step_inputs)

    @staticmethod
    def collect(handle: InFlightStep | InFlightChunks) -> Sampled:
        """A step's (or local chunks') sampled rows as host arrays (blocks until they have run)."""
        return handle.host()

    def step(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        pages: Sequence[Sequence[int]],
        sampling: Sequence[SamplingRow],
        forced: Sequence[int],
    ) -> Sampled:
        """One decode step, dispatched and collected."""
        return self.collect(self.dispatch(tokens, positions, pages, sampling, forced))


def build_decode_replica(
    index: int,
    mesh: Mesh,
    graphdef: nnx.GraphDef,
    state: Any,
    sizes: ServingSizes,
    attention_backend: str | None,
    kv_dtype: str | None = None,
    local_chunk: int | None = None,
) -> DecodeReplica:
    """Place the params on ``mesh`` with the decode rules and allocate its page pools (KV in ``kv_dtype``,
    default the params' dtype). ``local_chunk``: tokens per local-prefill chunk (None: ``local_shape``'s;
    0: no local prefill programs are compiled)."""
    shape = model_shape(graphdef, state)
    params = place_params(state, mesh, PHASE_RULES["decode"], shape)
    return DecodeReplica(
        index,
        mesh,
        graphdef,
        params,
        shape,
        num_pages=sizes.num_pages,
        page_size=sizes.page_size,
        prefill_buckets=sizes.prefill_buckets,
        batch_buckets=sizes.batch_buckets,
        page_buckets=sizes.page_buckets,
        attention_backend=attention_backend,
        kv_dtype=jnp.dtype(kv_dtype or jax.tree.leaves(state)[0].dtype),
        local_chunk=local_shape(sizes)[1] if local_chunk is None else local_chunk,
        local_batch=local_shape(sizes)[0],
    )
