"""Which devices a launch uses, decided before and just after JAX starts.

``jdisagg launch`` with no flags, and ``Engine(prefill_mesh="4x1", decode_mesh="2x2")`` in a plain Python
session, must run on a laptop: without an accelerator that means splitting the host CPU into virtual
devices, which only works before JAX initialises its backends. Once it has, the best we can do is name the
call that would have fixed it.
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
    if _count_fixed_by_xla_flags():
        return
    import jax

    jax.config.update("jax_num_cpu_devices", count)


def devices_needed(prefill: str | None, decode: str | None, colocate: bool) -> int:
    """Devices the meshes take (disjoint: the sum; colocated: the larger); 0 for a spec that is a typo.

    A typo is not this function's to report: the layout names it with the rest of the error.
    """
    from jdisagg.meshes import parse_mesh_spec

    try:
        p, d = (parse_mesh_spec(spec).num_devices for spec in (prefill or "1x1", decode or "1x1"))
    except ValueError:
        return 0
    return max(p, d) if colocate else p + d


def host_devices_for(prefill: str | None, decode: str | None, colocate: bool) -> int:
    """The CPU split of a CLI run: 8 devices (room for the default meshes), more if the meshes need them."""
    return max(HOST_DEVICES, devices_needed(prefill, decode, colocate))


def provide_cpu_devices(needed: int) -> None:
    """Make sure ``needed`` devices are visible when JAX runs on the CPU: what ``jdisagg launch`` does.

    Before JAX starts, the CPU platform is split into ``needed`` devices (never fewer than an explicit
    ``jax_num_cpu_devices``; an ``XLA_FLAGS`` device count is the user's choice and left alone). After, too
    few CPU devices is a ``ValueError`` that names the call which fixes it. Accelerators are not touched.
    """
    import jax

    fixed_by_flags = _count_fixed_by_xla_flags()
    if not fixed_by_flags and jax.config.jax_num_cpu_devices < needed:
        try:
            jax.config.update("jax_num_cpu_devices", needed)
            return
        except RuntimeError:  # JAX has started: too late to split the CPU
            pass
    visible = jax.device_count()
    if jax.default_backend() != "cpu" or visible >= needed:
        return
    if fixed_by_flags:
        raise ValueError(
            f"the meshes need {needed} devices but XLA_FLAGS splits the CPU into {visible}: set "
            f"--xla_force_host_platform_device_count={needed} in XLA_FLAGS (or drop it: jdisagg splits the "
            "CPU itself)"
        )
    raise ValueError(
        f"the meshes need {needed} devices but JAX already runs on {visible} CPU device(s), too late to "
        f'split the CPU: call jax.config.update("jax_num_cpu_devices", {needed}) right after '
        "`import jax`, before any JAX operation (or create the Engine before using JAX)"
    )


def _count_fixed_by_xla_flags() -> bool:
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


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
