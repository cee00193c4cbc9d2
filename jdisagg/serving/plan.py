"""``jdisagg info``: what a launch with these flags would put where, without loading any weights.

The model is built abstractly (shapes only), and every parameter goes through the same per-phase rules
(``jdisagg.meshes.PHASE_RULES``) the engine places it with, so the table cannot drift from what runs.
"""

from __future__ import annotations

import re

from flax import nnx
from jax.sharding import PartitionSpec

from jdisagg.meshes import PHASE_RULES, Layout, check_fits, param_spec, stored_kv_heads
from jdisagg.models import Llama, ModelConfig
from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.models.naming import param_path

_LAYER = re.compile(r"layers/\d+/")


def model_config(model: str | None) -> ModelConfig:
    """The config of a checkpoint directory (HF or jdisagg: both keep a ``config.json``), or the demo's."""
    return DEMO_CONFIG if model is None else ModelConfig.from_hf(model)


def sharding_table(config: ModelConfig, layout: Layout) -> str:
    """One row per distinct parameter (layers folded into ``layers/*``): shape and each phase's spec."""
    phases = (layout.prefill, layout.decode)
    for phase in phases:
        check_fits(phase.spec, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, phase=phase.name)
    heads = {"num_heads": config.num_heads, "num_kv_heads": config.num_kv_heads}
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    rows: dict[str, list[str]] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = param_path(path)
        folded = _LAYER.sub("layers/*/", name)
        if folded in rows:
            continue
        shape = tuple(var.shape)
        rows[folded] = [folded, str(shape)] + [
            _spec_text(param_spec(name, shape, p.spec.tp, PHASE_RULES[p.name], heads)) for p in phases
        ]
    rows["kv"] = ["kv cache heads", str(config.num_kv_heads)] + [_kv_text(config, p.spec.tp) for p in phases]
    return _table(["param", "shape", f"prefill tp={layout.prefill.spec.tp}",
                   f"decode tp={layout.decode.spec.tp}"], list(rows.values()))


def _kv_text(config: ModelConfig, tp: int) -> str:
    """KV heads are split over tp; with fewer kv heads than shards each is first repeated (see meshes)."""
    stored = stored_kv_heads(config.num_kv_heads, tp)
    return "split over tp" if stored == config.num_kv_heads else f"repeated to {stored}, split over tp"


def _spec_text(spec: PartitionSpec) -> str:
    if all(axis is None for axis in spec):
        return "replicated"
    return "(" + ", ".join("-" if axis is None else str(axis) for axis in spec) + ")"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])
