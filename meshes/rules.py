"""Per-phase sharding rules as data: parameter path pattern -> PartitionSpec.

Megatron-style tensor parallelism: column-split the projections that fan out (q/k/v, gate/up, lm_head) and
row-split the ones that fan back in (o, down), so each block needs one all-reduce. A rule only shards when
the heads it splits divide evenly over ``tp``; otherwise that weight is replicated (kv heads with
``tp > num_kv_heads``). A new model family adds rules here, not code paths in the engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .layout import TP_AXIS


@dataclass(frozen=True)
class ShardRule:
    """Params whose path fully matches ``pattern`` get ``spec``.

    ``heads`` names the head count (``"num_heads"`` / ``"num_kv_heads"``) that the sharded dimension is made
    of; the rule applies only if that count divides by the tensor-parallel degree.
    """

    pattern: str
    spec: tuple[str | None, ...]
    heads: str | None = None


_COLUMN = (None, TP_AXIS)
_ROW = (TP_AXIS, None)

LLAMA_RULES: tuple[ShardRule, ...] = (
    ShardRule(r"layers/\d+/self_attn/q_proj/kernel", _COLUMN, "num_heads"),
    ShardRule(r"layers/\d+/self_attn/q_proj/bias", (TP_AXIS,), "num_heads"),
    ShardRule(r"layers/\d+/self_attn/[kv]_proj/kernel", _COLUMN, "num_kv_heads"),
    ShardRule(r"layers/\d+/self_attn/[kv]_proj/bias", (TP_AXIS,), "num_kv_heads"),
    ShardRule(r"layers/\d+/self_attn/o_proj/kernel", _ROW, "num_heads"),
    ShardRule(r"layers/\d+/mlp/(gate|up)_proj/kernel", _COLUMN),
    ShardRule(r"layers/\d+/mlp/down_proj/kernel", _ROW),
    # Serving's fused projections (jdisagg.models.fused): kv-head-grouped q/k/v, and gate/up stacked.
    ShardRule(r"layers/\d+/self_attn/qkv_proj/kernel", _COLUMN, "num_kv_heads"),
    ShardRule(r"layers/\d+/self_attn/qkv_proj/bias", (TP_AXIS,), "num_kv_heads"),
    ShardRule(r"layers/\d+/mlp/gate_up_proj/kernel", (None, None, TP_AXIS)),
    ShardRule(r"lm_head/kernel", _COLUMN),
)

# Both phases use Megatron TP inside a replica today; they are separate entries so a phase can diverge
# (e.g. a vocab-replicated lm_head for small-batch decode) without touching the engine.
PHASE_RULES: Mapping[str, tuple[ShardRule, ...]] = {"prefill": LLAMA_RULES, "decode": LLAMA_RULES}


def param_spec(
    path: str, shape: tuple[int, ...], tp: int, rules: tuple[ShardRule, ...], head_counts: Mapping[str, int]
) -> PartitionSpec:
    """The PartitionSpec of one parameter; replicated when no rule matches or the split would be uneven."""
    for rule in rules:
        if not re.fullmatch(rule.pattern, path):
            continue
        if rule.heads is not None and head_counts[rule.heads] % tp:
            return PartitionSpec()
        for dim, axis in zip(shape, rule.spec, strict=False):
            if axis is not None and dim % tp:
                return PartitionSpec()
        return PartitionSpec(*rule.spec)
    return PartitionSpec()


def param_sharding_fn(mesh: Mesh, rules: tuple[ShardRule, ...], head_counts: Mapping[str, int]):
    """``(path, shape) -> NamedSharding`` for placing a model's params on one replica's mesh."""
    tp = mesh.shape[TP_AXIS]

    def sharding(path: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, param_spec(path, shape, tp, rules, head_counts))

    return sharding
