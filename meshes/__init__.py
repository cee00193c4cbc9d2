"""Mesh specs, device layouts and per-phase sharding rules (imported as ``jdisagg.meshes``)."""

from .layout import TP_AXIS, Layout, PhaseLayout, build_layout, check_fits, stored_kv_heads
from .rules import LLAMA_RULES, PHASE_RULES, ShardRule, param_sharding_fn, param_spec
from .spec import MeshSpec, parse_mesh_spec

__all__ = [
    "LLAMA_RULES",
    "PHASE_RULES",
    "TP_AXIS",
    "Layout",
    "MeshSpec",
    "PhaseLayout",
    "ShardRule",
    "build_layout",
    "check_fits",
    "param_sharding_fn",
    "param_spec",
    "parse_mesh_spec",
    "stored_kv_heads",
]
