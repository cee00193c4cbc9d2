"""The sample programs of a replica and the per-row inputs they take, uploaded once per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jdisagg.executors import CompileTask, Sampled, SamplingRow
from jdisagg.placement import put_replicated as _put
from jdisagg.programs import compile_sample
from jdisagg.sampling import SampleBranches, branches_for

# The batches the cond-free programs serve (SampleBranches: sample, top_k, top_p, top_logprobs): greedy,
# sampled, sampled with top-k, top-p or both. A batch that asks for top log-probs takes the program with
# conds.
PICKED_ON_HOST = tuple(
    SampleBranches(sample, top_k, top_p, False)
    for sample, top_k, top_p in ((False, False, False), (True, False, False), (True, True, False),
                                 (True, False, True), (True, True, True))
)


def branches_on_host_by_default(platform: str) -> bool:
    """Whether a replica compiles cond-free sample programs (``SampleBranches``) besides the general one.

    On a GPU a ``lax.cond`` blocks the launching thread until the device reaches it, so the decode thread
    would wait for each step before queueing the next. On the CPU a cond costs nothing of the kind (the
    program runs on its own threads), and a TPU evaluates it on the chip; there the extra programs would
    only add compile time."""
    return platform == "gpu"


class Sampler:
    """The sample programs of one replica, per batch bucket (``programs.compile_sample``): one that picks
    its branches on device, and with ``branches_on_host`` (default: by platform) the cond-free ones of
    ``PICKED_ON_HOST``, used whenever a batch's branches are one of those."""

    def __init__(
        self, mesh: Mesh, vocab_size: int, buckets: tuple[int, ...], branches_on_host: bool | None = None
    ) -> None:
        self.mesh, self.vocab_size, self.buckets = mesh, vocab_size, buckets
        if branches_on_host is None:
            branches_on_host = branches_on_host_by_default(mesh.devices.flat[0].platform)
        picked = PICKED_ON_HOST if branches_on_host else ()
        self.variants: tuple[SampleBranches | None, ...] = (None, *picked)
        self._compiled: dict[tuple[int, SampleBranches | None], jax.stages.Compiled] = {}
        # The batch composition whose per-row inputs are on device, those inputs, and the program to run.
        self._rows: tuple[tuple | None, tuple[jax.Array, ...], SampleBranches | None] = (None, (), None)

    def compile_tasks(self, owner: str) -> list[CompileTask]:
        def task(batch: int, branches: SampleBranches | None) -> Callable[[], None]:
            def run() -> None:
                self._compiled[batch, branches] = compile_sample(batch, self.vocab_size, self.mesh, branches)

            return run

        def name(batch: int, branches: SampleBranches | None) -> str:
            if branches is None:
                return f"sample[{owner}] batch {batch}"
            parts = [part for part, needed in branches._asdict().items() if needed] or ["greedy"]
            return f"sample[{owner}] batch {batch} {'+'.join(parts)} only"

        return [(name(b, v), task(b, v)) for b in self.buckets for v in self.variants]

    def __call__(
        self,
        logits: jax.Array,
        rows: Sequence[SamplingRow],
        positions: Sequence[int] | jax.Array,
        forced: Sequence[int],
    ) -> Sampled:
        """Dispatch sampling of ``logits`` ``[batch, V]`` (on device) for ``rows``; padding rows: greedy.

        Only the positions change from one steady-state step to the next, so the other per-row inputs are
        uploaded once per batch composition, as two arrays, and reused while it lasts (with the program
        picked for them); ``positions`` may already be on device, ``[batch]`` (the decode program computes
        them), and then nothing is uploaded.
        """
        batch, mesh = logits.shape[0], self.mesh
        pad = batch - len(rows)
        key = (batch, tuple(rows), tuple(forced))
        cached_key, on_device, branches = self._rows  # one read: a worker may serve two calls at once
        if cached_key != key:
            host = (
                np.array([r.temperature for r in rows] + [0.0] * pad, np.float32),
                np.array([r.top_k for r in rows] + [0] * pad, np.int32),
                np.array([r.top_p for r in rows] + [1.0] * pad, np.float32),
                np.array([r.seed for r in rows] + [0] * pad, np.uint32),
                np.array(list(forced) + [-1] * pad, np.int32),
                np.array([r.num_top for r in rows] + [0] * pad, np.int32),
            )
            temperature, top_k, top_p, seeds, forced_ids, num_top = host
            branches = branches_for(temperature, top_k, top_p, forced_ids, num_top, self.vocab_size)
            if branches not in self.variants:
                branches = None
            floats = np.stack([temperature, top_p])  # the layout programs.packed_sample_fn unpacks
            ints = np.stack([top_k, seeds.view(np.int32), forced_ids, num_top])
            on_device = (_put(mesh, floats), _put(mesh, ints))
            self._rows = (key, on_device, branches)
        if isinstance(positions, jax.Array):
            positions_ids = positions
        else:
            positions_ids = _put(mesh, np.array(list(positions) + [0] * pad, np.int32))
        return self._compiled[batch, branches](logits, *on_device, positions_ids)
