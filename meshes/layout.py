"""Device layouts: which devices prefill and decode own, and the per-replica meshes they compile for.

Every data-parallel replica is its own ``Mesh`` with a single ``tp`` axis. Replicas never talk to each other,
so each runs its own batch at its own pace (no lockstep between a replica with one sequence and one with 64),
owns its own page pool, and a KV hand-off targets exactly one replica's devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

from .spec import MeshSpec, parse_mesh_spec

TP_AXIS = "tp"


@dataclass(frozen=True)
class PhaseLayout:
    """The replicas of one phase (prefill or decode), each a 1-D ``tp`` mesh."""

    name: str
    spec: MeshSpec
    replicas: tuple[Mesh, ...]

    @property
    def devices(self) -> list[jax.Device]:
        return [d for mesh in self.replicas for d in mesh.devices.flat]


@dataclass(frozen=True)
class Layout:
    prefill: PhaseLayout
    decode: PhaseLayout
    colocated: bool

    def describe(self) -> str:
        mode = "colocated" if self.colocated else "disaggregated"
        lines = [f"layout: {mode}"]
        for phase in (self.prefill, self.decode):
            for i, mesh in enumerate(phase.replicas):
                ids = ",".join(str(d.id) for d in mesh.devices.flat)
                lines.append(f"  {phase.name}[{i}]: tp={phase.spec.tp} devices [{ids}]")
        return "\n".join(lines)


def _phase(name: str, spec: MeshSpec, devices: Sequence[jax.Device]) -> PhaseLayout:
    replicas = tuple(
        Mesh(np.array(devices[r * spec.tp : (r + 1) * spec.tp]), (TP_AXIS,)) for r in range(spec.dp)
    )
    return PhaseLayout(name=name, spec=spec, replicas=replicas)


def build_layout(
    prefill: str | MeshSpec,
    decode: str | MeshSpec,
    *,
    colocate: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> Layout:
    """Place prefill on the first devices and decode on the next ones (or on the same ones when colocated)."""
    p, d = parse_mesh_spec(prefill), parse_mesh_spec(decode)
    devices = list(jax.devices() if devices is None else devices)
    need = max(p.num_devices, d.num_devices) if colocate else p.num_devices + d.num_devices
    if need > len(devices):
        how = "colocated" if colocate else f"disjoint: {p.num_devices} prefill + {d.num_devices} decode"
        raise ValueError(
            f"prefill mesh {p} and decode mesh {d} need {need} devices ({how}), "
            f"but only {len(devices)} {devices[0].platform} devices are visible"
        )
    if colocate:
        return Layout(_phase("prefill", p, devices), _phase("decode", d, devices), colocated=True)
    return Layout(
        _phase("prefill", p, devices[: p.num_devices]),
        _phase("decode", d, devices[p.num_devices : p.num_devices + d.num_devices]),
        colocated=False,
    )


def stored_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads a phase stores: the model's own, or ``tp`` copies when there are fewer kv heads than shards.

    With ``tp > num_kv_heads`` each shard needs one whole kv head next to its query heads, so kv heads are
    repeated (``h`` -> ``h * tp // num_kv_heads`` ...), the same trade vLLM makes: more KV memory, no
    cross-shard traffic in attention.
    """
    if num_kv_heads % tp == 0:
        return num_kv_heads
    return tp


def check_fits(spec: MeshSpec, *, num_heads: int, num_kv_heads: int, phase: str) -> None:
    """Reject a tensor-parallel degree the model's heads can't be split over."""
    if num_heads % spec.tp:
        raise ValueError(
            f"{phase} mesh {spec}: tp={spec.tp} does not divide the model's {num_heads} attention heads"
        )
    if num_kv_heads % spec.tp and spec.tp % num_kv_heads:
        raise ValueError(
            f"{phase} mesh {spec}: tp={spec.tp} neither divides the model's {num_kv_heads} kv heads "
            "nor is a multiple of them (kv heads can be split or replicated, not both)"
        )
