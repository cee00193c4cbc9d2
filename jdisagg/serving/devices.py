"""Which devices a launch uses, decided before and just after JAX starts.

``jdisagg launch`` with no flags must serve on a laptop: without an accelerator that means splitting the
host CPU into virtual devices, which only works before JAX initialises its backends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("jdisagg.serving")

HOST_DEVICES = 8
DEFAULT_PREFILL_MESH = "4x1"
DEFAULT_DECODE_MESH = "2x2"


def request_host_devices(count: int = HOST_DEVICES) -> None:
    """Split the CPU platform into ``count`` devices unless the user's ``XLA_FLAGS`` already chose a count.

    Harmless with an accelerator: it shapes only the CPU platform, which JAX then does not use by default.
    Must run before anything touches ``jax.devices()``.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", count)


@dataclass(frozen=True)
class MeshChoice:
    prefill: str
    decode: str
    colocate: bool


def choose_meshes(prefill: str | None, decode: str | None, colocate: bool, num_devices: int) -> MeshChoice:
    """The user's meshes, with defaults for those not given: 4x1 + 2x2 on 8 devices, or what fits fewer.

    Explicit meshes are never changed (an impossible one is the user's error to see). Fallback defaults stay
    powers of two so they divide the head counts of common models.
    """
    need = 4 if colocate else 8
    if num_devices >= need or (prefill and decode):
        return MeshChoice(prefill or DEFAULT_PREFILL_MESH, decode or DEFAULT_DECODE_MESH, colocate)
    if num_devices == 1:
        fallback = MeshChoice(prefill or "1x1", decode or "1x1", True)
    else:
        per_phase = num_devices if colocate else num_devices // 2
        tp = 1 << (per_phase.bit_length() - 1)
        fallback = MeshChoice(prefill or f"{tp}x1", decode or f"{tp}x1", colocate)
    log.warning(
        "only %d device(s): using prefill %s and decode %s%s instead of the %s + %s default",
        num_devices, fallback.prefill, fallback.decode, " (colocated)" if fallback.colocate else "",
        DEFAULT_PREFILL_MESH, DEFAULT_DECODE_MESH,
    )
    return fallback


def describe_devices() -> str:
    """One line naming the devices JAX will use, e.g. ``8 cpu devices (cpu)``."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} {devices[0].platform} device(s) ({', '.join(kinds)})"
