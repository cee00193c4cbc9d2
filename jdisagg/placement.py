"""Where a replica's params and hand-off KV live: the model's shape, the params placed by phase rules, and
the sharding of the KV hand-off. Shared by the prefill and decode replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.kv_cache import kv_sharding
from jdisagg.meshes import TP_AXIS, ShardRule, param_spec
from jdisagg.models.naming import keypath_param_path


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


def put_replicated(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """A host array copied whole onto every device of ``mesh`` (program inputs: tokens, tables, ids)."""
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec()))


def model_shape(graphdef: nnx.GraphDef, state: Any) -> ModelShape:
    config = nnx.merge(graphdef, state).config
    return ModelShape(
        config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size
    )
