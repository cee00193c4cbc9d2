"""Device-side state of one replica: its params, page pools and compiled programs.

A replica object is used by exactly one engine thread (prefill replicas by the prefill thread, a decode
replica by its own decode thread, ``receive`` by the transfer thread), so nothing here locks. Which page
holds what is the scheduler's business (``jdisagg.kv_manager``); a decode replica only has the pools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.chunked_prefill import ChunkedPrefill, kv_nbytes, kv_pieces
from jdisagg.executors import CompileTask, PromptInput, Sampled, SamplingRow
from jdisagg.kv_cache import init_page_pools, kv_sharding
from jdisagg.kv_manager import SCRATCH_PAGE
from jdisagg.meshes import PHASE_RULES, TP_AXIS, ShardRule, param_spec, stored_kv_heads
from jdisagg.models.naming import keypath_param_path
from jdisagg.programs import (
    bucket_for,
    compile_decode,
    compile_insert,
    compile_prefill,
    compile_prefill_batch,
    compile_sample,
    compile_sample_rows,
    plan_prefill_calls,
)
from jdisagg.sizes import ServingSizes


@dataclass(frozen=True)
class InFlightStep:
    """A dispatched decode step: its sampled rows, still on device (the first ``rows`` are real)."""

    rows: int
    sampled: Sampled


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


def place_params(state: Any, mesh: Mesh, rules: tuple[ShardRule, ...], shape: ModelShape) -> Any:
    """Copy params onto one replica's mesh with the phase's sharding rules."""
    tp = mesh.shape[TP_AXIS]
    heads = {"num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads}

    def place(keypath, x):
        spec = param_spec(keypath_param_path(keypath), tuple(x.shape), tp, rules, heads)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state)


def handoff_sharding(mesh: Mesh, num_kv_heads: int) -> NamedSharding:
    """Sharding of the hand-off KV ``[L, T, KVH, D]`` on a replica: kv heads split over ``tp`` when they
    divide, else replicated (the decode side repeats them into its pool)."""
    tp = mesh.shape[TP_AXIS]
    return kv_sharding(mesh, num_kv_heads if num_kv_heads % tp == 0 else 1, head_axis=2)


def _put(mesh: Mesh, array: np.ndarray) -> jax.Array:
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec()))


class Sampler:
    """The sample programs of one replica, one per batch bucket (``programs.compile_sample``)."""

    def __init__(self, mesh: Mesh, vocab_size: int, buckets: tuple[int, ...]) -> None:
        self.mesh, self.vocab_size, self.buckets = mesh, vocab_size, buckets
        self._compiled: dict[int, jax.stages.Compiled] = {}
        # The batch composition whose per-row inputs are on device, and those inputs.
        self._rows: tuple[tuple | None, tuple[jax.Array, ...]] = (None, ())

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def task(batch: int) -> Callable[[], None]:
            def run() -> None:
                self._compiled[batch] = compile_sample(batch, self.vocab_size, self.mesh)

            return run

        return [(f"sample[{owner}] batch {b}", task(b)) for b in self.buckets]

    def __call__(
        self,
        logits: jax.Array,
        rows: Sequence[SamplingRow],
        positions: Sequence[int],
        forced: Sequence[int],
    ) -> Sampled:
        """Dispatch sampling of ``logits`` ``[batch, V]`` (on device) for ``rows``; padding rows: greedy.

        Only the positions change from one steady-state step to the next, so the other per-row inputs are
        uploaded once per batch composition and reused while it lasts.
        """
        batch, mesh = logits.shape[0], self.mesh
        pad = batch - len(rows)
        key = (batch, tuple(rows), tuple(forced))
        cached_key, on_device = self._rows  # one read: a worker may serve two calls at once
        if cached_key != key:
            on_device = (
                _put(mesh, np.array([r.temperature for r in rows] + [0.0] * pad, np.float32)),
                _put(mesh, np.array([r.top_k for r in rows] + [0] * pad, np.int32)),
                _put(mesh, np.array([r.top_p for r in rows] + [1.0] * pad, np.float32)),
                _put(mesh, np.array([r.seed for r in rows] + [0] * pad, np.uint32)),
                _put(mesh, np.array(list(forced) + [-1] * pad, np.int32)),
                _put(mesh, np.array([r.num_top for r in rows] + [0] * pad, np.int32)),
            )
            self._rows = (key, on_device)
        temperature, top_k, top_p, seeds, forced_ids, num_top = on_device
        positions_ids = _put(mesh, np.array(list(positions) + [0] * pad, np.int32))
        return self._compiled[batch](
            logits, temperature, top_k, top_p, seeds, positions_ids, forced_ids, num_top
        )


class PrefillReplica:
    """TP prefill on one replica mesh: prompt -> (first token, KV sharded by kv heads)."""

    alive = True  # in-process replicas live as long as the engine

    def __init__(
        self,
        index: int,
        mesh: Mesh,
        graphdef: nnx.GraphDef,
        state: Any,
        shape: ModelShape,
        buckets: tuple[int, ...],
        *,
        batch: int = 1,
        batched_buckets: tuple[int, ...] = (),
        chunked: ChunkedPrefill | None = None,
    ) -> None:
        self.index, self.mesh, self.buckets = index, mesh, buckets
        # prefill[batch, T] for T in batched_buckets (run_batch); a prompt on its own runs prefill[T].
        self.batch, self.batched_buckets = batch, batched_buckets if batch > 1 else ()
        self._batched: dict[int, jax.stages.Compiled] = {}
        self._sample_rows: jax.stages.Compiled | None = None
        self._graphdef, self._state = graphdef, state
        self.kv_sharding = handoff_sharding(mesh, shape.num_kv_heads)
        self._compiled: dict[int, jax.stages.Compiled] = {}
        self._sample = Sampler(mesh, shape.vocab_size, (1, batch) if self.batched_buckets else (1,))
        self._chunked = chunked  # prompts longer than the largest bucket; None: the context fits one bucket

    def compile_tasks(self) -> list[CompileTask]:
        def task(length: int) -> Callable[[], None]:
            def run() -> None:
                self._compiled[length] = compile_prefill(
                    self._graphdef, self._state, self.mesh, length, self.kv_sharding
                )

            return run

        programs = [(f"prefill[{self.index}] len {n}", task(n)) for n in self.buckets]
        if self._chunked is not None:
            programs += self._chunked.compile_tasks(str(self.index))
        return programs + self._batch_compile_tasks() + self._sample.compile_tasks(f"prefill {self.index}")

    def _batch_compile_tasks(self) -> list[CompileTask]:
        """prefill[batch, T] per batched bucket, and the program that cuts its sampled tokens into rows."""
        if not self.batched_buckets:
            return []

        def task(length: int) -> Callable[[], None]:
            def run() -> None:
                self._batched[length] = compile_prefill_batch(
                    self._graphdef, self._state, self.mesh, self.batch, length, self.kv_sharding
                )

            return run

        def rows() -> None:
            self._sample_rows = compile_sample_rows(self.batch, self.mesh)

        name = f"prefill[{self.index}] batch {self.batch} len"
        programs = [(f"{name} {n}", task(n)) for n in self.batched_buckets]
        return programs + [(f"sample_rows[prefill {self.index}] batch {self.batch}", rows)]

    def run(
        self, token_ids: Sequence[int], sampling: SamplingRow, forced: int = -1
    ) -> tuple[Sampled, tuple[jax.Array, jax.Array]]:
        """Dispatch prefill (asynchronously); returns device arrays: the first token sampled (one row) and
        the prompt's (k, v).

        ``forced >= 0`` takes that token instead of sampling one (scoring a given continuation)."""
        if len(token_ids) > self.buckets[-1]:
            return self._run_chunked(token_ids, sampling, forced)
        length = bucket_for(len(token_ids), self.buckets)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(token_ids)] = token_ids
        logits, k, v = self._compiled[length](
            self._state, _put(self.mesh, tokens), _put(self.mesh, np.int32(len(token_ids)))
        )
        return self._sample(logits, [sampling], [len(token_ids)], [forced]), (k, v)

    def _run_chunked(
        self, token_ids: Sequence[int], sampling: SamplingRow, forced: int
    ) -> tuple[Sampled, Any]:
        """A prompt longer than the largest bucket, prefilled chunk by chunk (``jdisagg.chunked_prefill``);
        its hand-off is a ``ChunkedKV`` of one piece per chunk."""
        if self._chunked is None:
            raise ValueError(f"{len(token_ids)} tokens exceed the largest prefill bucket {self.buckets[-1]}")
        logits, kv = self._chunked(token_ids)
        return self._sample(logits, [sampling], [len(token_ids)], [forced]), kv

    def run_batch(self, prompts: Sequence[PromptInput]) -> list[tuple[Sampled, tuple[jax.Array, jax.Array]]]:
        """Per prompt, in order, what ``run`` gives for it alone (first token one row, KV of its own), from as
        few calls as the compiled shapes allow (``plan_prefill_calls``), each dispatched asynchronously."""
        lengths = [len(p.token_ids) for p in prompts]
        by_index = {}
        for call in plan_prefill_calls(lengths, self.buckets, self.batched_buckets, self.batch):
            if len(call) == 1:
                p = prompts[call[0]]
                by_index[call[0]] = self.run(p.token_ids, p.sampling, p.forced)
            else:
                by_index.update(zip(call, self._run_batched([prompts[i] for i in call]), strict=True))
        return [by_index[i] for i in range(len(prompts))]

    def _run_batched(
        self, prompts: Sequence[PromptInput]
    ) -> list[tuple[Sampled, tuple[jax.Array, jax.Array]]]:
        """One prefill[batch, T] call for up to ``batch`` prompts of bucket T at most; one sampler call."""
        length = bucket_for(max(len(p.token_ids) for p in prompts), self.batched_buckets)
        tokens = np.zeros((self.batch, length), np.int32)
        lengths = np.ones((self.batch,), np.int32)  # padding rows: one token, never read
        for row, p in enumerate(prompts):
            tokens[row, : len(p.token_ids)] = p.token_ids
            lengths[row] = len(p.token_ids)
        logits, kvs = self._batched[length](self._state, _put(self.mesh, tokens), _put(self.mesh, lengths))
        rows = [p.sampling for p in prompts]
        sampled = self._sample(logits, rows, lengths[: len(prompts)].tolist(), [p.forced for p in prompts])
        return list(zip(self._sample_rows(sampled), kvs, strict=True))[: len(prompts)]


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
        ] + self._sample.compile_tasks(f"decode {self.index}")

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

    local_chunk = 0  # no local prefill program yet (issue 16 adds it)

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
        pos = np.zeros((batch,), np.int32)
        table = np.full((batch, width), SCRATCH_PAGE, np.int32)
        pos[:n] = positions
        for row, seq_pages in enumerate(pages):
            table[row, : len(seq_pages)] = seq_pages
        if isinstance(tokens, InFlightStep):
            tok = tokens.sampled.tokens
        else:
            tok = np.zeros((batch,), np.int32)
            tok[:n] = tokens
            tok = _put(self.mesh, tok)
        logits, self.pools = self._decode[batch, width](
            self._state, self.pools, tok, _put(self.mesh, pos), _put(self.mesh, table)
        )
        return InFlightStep(n, self._sample(logits, sampling, [p + 1 for p in positions], forced))

    @staticmethod
    def collect(step: InFlightStep) -> Sampled:
        """The step's sampled rows as host arrays (blocks until it has run)."""
        return Sampled(*(np.asarray(x)[: step.rows] for x in step.sampled))

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


def model_shape(graphdef: nnx.GraphDef, state: Any) -> ModelShape:
    config = nnx.merge(graphdef, state).config
    return ModelShape(
        config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size
    )


def build_prefill_replica(
    index: int, mesh: Mesh, graphdef: nnx.GraphDef, state: Any, sizes: ServingSizes
) -> PrefillReplica:
    """Place the params on ``mesh`` with the prefill rules; programs compile later (``compile_tasks``)."""
    shape = model_shape(graphdef, state)
    params = place_params(state, mesh, PHASE_RULES["prefill"], shape)
    return PrefillReplica(
        index,
        mesh,
        graphdef,
        params,
        shape,
        sizes.prefill_buckets,
        batch=sizes.max_prefill_batch,
        batched_buckets=sizes.batched_prefill_buckets,
        chunked=ChunkedPrefill(mesh, graphdef, params, chunk=sizes.chunk, capacity=sizes.chunk_capacity,
                               kv_out=handoff_sharding(mesh, shape.num_kv_heads)) if sizes.chunked else None,
    )


def build_decode_replica(
    index: int,
    mesh: Mesh,
    graphdef: nnx.GraphDef,
    state: Any,
    sizes: ServingSizes,
    attention_backend: str | None,
    kv_dtype: str | None = None,
) -> DecodeReplica:
    """Place the params on ``mesh`` with the decode rules and allocate its page pools (KV in ``kv_dtype``,
    default the params' dtype)."""
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
    )
