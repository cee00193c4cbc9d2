"""The sample programs of a replica and the per-row inputs they take, uploaded once per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jdisagg.executors import CompileTask, Sampled, SamplingRow
from jdisagg.placement import put_replicated as _put
from jdisagg.programs import compile_sample


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
