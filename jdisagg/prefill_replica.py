"""The prefill replica: TP prefill of prompts on one mesh, returning first tokens and KV hand-offs.

Used by the prefill thread only (``run_batch``), so nothing here locks. Short prompts run bucketed
``prefill[T]`` programs (several at once where a batched program fits), long ones run chunk by chunk
(``jdisagg.chunked_prefill``), from the first chunk the replica's own prefix cache does not hold
(``jdisagg.prefill_cache``); a prompt whose prefix the decode replica already holds hands off only its
suffix (``jdisagg.kv_suffix``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jdisagg.buckets import bucket_for, plan_prefill_calls
from jdisagg.chunked_prefill import ChunkedPrefill
from jdisagg.executors import CompileTask, PromptInput, Sampled, SamplingRow
from jdisagg.kv_suffix import SuffixCutter
from jdisagg.meshes import PHASE_RULES
from jdisagg.placement import ModelShape, handoff_sharding, model_shape, place_params
from jdisagg.placement import put_replicated as _put
from jdisagg.prefill_cache import CachedChunkedPrefill, ChunkCache, default_cache_bytes
from jdisagg.programs import compile_prefill, compile_prefill_batch, compile_sample_rows
from jdisagg.sampler import Sampler
from jdisagg.sizes import ServingSizes


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
        batched: Mapping[int, tuple[int, ...]] | None = None,
        chunked: ChunkedPrefill | None = None,
        suffix: SuffixCutter | None = None,
    ) -> None:
        self.index, self.mesh, self.buckets = index, mesh, buckets
        # prefill[B, T] for the batch sizes B of each length bucket T in batched (run_batch); a prompt on its
        # own runs prefill[T].
        self.batched = dict(batched or {})
        self._batched: dict[tuple[int, int], jax.stages.Compiled] = {}
        self._sample_rows: dict[int, jax.stages.Compiled] = {}
        self._graphdef, self._state = graphdef, state
        self.kv_sharding = handoff_sharding(mesh, shape.num_kv_heads)
        self._compiled: dict[int, jax.stages.Compiled] = {}
        self._sample = Sampler(mesh, shape.vocab_size, (1, *self._batch_sizes))
        self._chunked = chunked  # prompts longer than the largest bucket; None: the context fits one bucket
        self._suffix = suffix  # cuts the hand-off of a prompt with cached tokens; None: none are sent here

    @property
    def prefill_cache(self) -> ChunkCache | None:
        """This replica's cache of long prompts' leading chunks (None: off, or no prompt is chunked)."""
        return self._chunked.cache if isinstance(self._chunked, CachedChunkedPrefill) else None

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
        if self._suffix is not None:
            programs += self._suffix.compile_tasks(str(self.index))
        return programs + self._batch_compile_tasks() + self._sample.compile_tasks(f"prefill {self.index}")

    @property
    def _batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({b for sizes in self.batched.values() for b in sizes}))

    def _batch_compile_tasks(self) -> list[CompileTask]:
        """prefill[B, T] per batched shape, and per batch size the program that cuts its sampled tokens into
        rows."""
        def task(batch: int, length: int) -> Callable[[], None]:
            def run() -> None:
                self._batched[batch, length] = compile_prefill_batch(
                    self._graphdef, self._state, self.mesh, batch, length, self.kv_sharding
                )

            return run

        def rows(batch: int) -> Callable[[], None]:
            def run() -> None:
                self._sample_rows[batch] = compile_sample_rows(batch, self.mesh)

            return run

        programs = [(f"prefill[{self.index}] batch {b} len {n}", task(b, n))
                    for n, sizes in self.batched.items() for b in sizes]
        cut = [(f"sample_rows[prefill {self.index}] batch {b}", rows(b)) for b in self._batch_sizes]
        return programs + cut

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
        few calls as the compiled shapes allow (``plan_prefill_calls``), each dispatched asynchronously.

        A prompt with ``cached_tokens`` is prefilled as any other (a long one from the first chunk this
        replica's own cache lacks), but its KV is cut to the positions after them (``jdisagg.kv_suffix``): the
        decode replica already holds the rest."""
        lengths = [len(p.token_ids) for p in prompts]
        for p in prompts:
            if p.cached_tokens and self._suffix is None:
                raise ValueError(f"prefill replica {self.index} cannot hand off a suffix (cached_tokens="
                                 f"{p.cached_tokens}): it has no kv_window programs")
            if p.cached_tokens:
                self._suffix.check(len(p.token_ids), p.cached_tokens)
        by_index = {}
        for call in plan_prefill_calls(lengths, self.buckets, self.batched):
            if call.rows == 1:
                p = prompts[call.prompts[0]]
                by_index[call.prompts[0]] = self.run(p.token_ids, p.sampling, p.forced)
            else:
                batch = [prompts[i] for i in call.prompts]
                by_index.update(zip(call.prompts, self._run_batched(batch, call.rows), strict=True))
        for i, p in enumerate(prompts):
            if p.cached_tokens:
                sampled, kv = by_index[i]
                by_index[i] = sampled, self._suffix(kv, len(p.token_ids), p.cached_tokens)
        return [by_index[i] for i in range(len(prompts))]

    def _run_batched(
        self, prompts: Sequence[PromptInput], batch: int
    ) -> list[tuple[Sampled, tuple[jax.Array, jax.Array]]]:
        """One prefill[batch, T] call for up to ``batch`` prompts of bucket T at most; one sampler call."""
        length = bucket_for(max(len(p.token_ids) for p in prompts), self.buckets)
        tokens = np.zeros((batch, length), np.int32)
        lengths = np.ones((batch,), np.int32)  # padding rows: one token, never read
        for row, p in enumerate(prompts):
            tokens[row, : len(p.token_ids)] = p.token_ids
            lengths[row] = len(p.token_ids)
        program = self._batched[batch, length]
        logits, kvs = program(self._state, _put(self.mesh, tokens), _put(self.mesh, lengths))
        rows = [p.sampling for p in prompts]
        sampled = self._sample(logits, rows, lengths[: len(prompts)].tolist(), [p.forced for p in prompts])
        return list(zip(self._sample_rows[batch](sampled), kvs, strict=True))[: len(prompts)]


def build_prefill_replica(
    index: int, mesh: Mesh, graphdef: nnx.GraphDef, state: Any, sizes: ServingSizes, *,
    suffix_handoff: bool = True, prefill_cache_bytes: int | None = 0,
) -> PrefillReplica:
    """Place the params on ``mesh`` with the prefill rules; programs compile later (``compile_tasks``).
    ``suffix_handoff``: compile the programs that cut a prompt's hand-off to its uncached suffix (the
    engine's prefix cache is on; off for worker processes whose front never sends cached tokens).
    ``prefill_cache_bytes``: the budget of this replica's own cache of long prompts' leading chunks
    (``jdisagg.prefill_cache``); 0 (the default: a replica built on its own keeps nothing between prompts)
    turns it off, None is ``default_cache_bytes`` (one full context of KV)."""
    shape = model_shape(graphdef, state)
    dtype = jax.tree.leaves(state)[0].dtype
    params = place_params(state, mesh, PHASE_RULES["prefill"], shape)
    kv_out = handoff_sharding(mesh, shape.num_kv_heads)
    suffix = SuffixCutter(
        mesh, kv_out, layers=shape.num_layers, kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        dtype=dtype, buckets=sizes.prefill_buckets, chunked=sizes.chunked,
        page_size=sizes.page_size,
    ) if suffix_handoff else None
    if prefill_cache_bytes is None:
        prefill_cache_bytes = default_cache_bytes(
            sizes.chunk_capacity, shape.num_layers, shape.num_kv_heads, shape.head_dim, dtype
        )
    chunked = None
    if sizes.chunked:
        options = {"chunk": sizes.chunk, "capacity": sizes.chunk_capacity, "kv_out": kv_out}
        cache = ChunkCache(prefill_cache_bytes, sizes.chunk, sizes.page_size) if prefill_cache_bytes else None
        chunked = (CachedChunkedPrefill(mesh, graphdef, params, **options, cache=cache) if cache is not None
                   else ChunkedPrefill(mesh, graphdef, params, **options))
    return PrefillReplica(
        index,
        mesh,
        graphdef,
        params,
        shape,
        sizes.prefill_buckets,
        batched=sizes.batched_prefill,
        chunked=chunked,
        suffix=suffix,
    )
