"""Fused projections for serving: q/k/v as one matrix and gate/up as one, built from the separate ones.

At decode's small batches every projection is a memory-bound GEMV; three q/k/v launches and two gate/up
launches per layer each read a slice of what one matmul over the concatenated matrix reads at once. So
every checkpoint keeps HF's separate tensors (loading, saving, the sharding rules and training are
unchanged), and the serving path fuses them once after loading, on the devices, in the sharding the
separate ones were given:

- ``qkv_proj`` ``[D, KVH, G + 2, hd]``: grouped by kv head, so when the kv heads are split over
  tensor parallelism, the KVH axis is split the same way and each device keeps exactly the query and kv
  heads it had (``jdisagg.models.llama.QKVProjection``). When the kv heads are replicated (``tp`` above
  the kv head count), q and k/v are sharded differently and stay separate.
- ``gate_up_proj`` ``[D, 2, F]``: F split as gate and up were.

``separate_params`` is the inverse, for writing a fused model out in the HF layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jdisagg.models.llama import UNFUSED, Fused, Llama

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
_NOT_COLUMN_SPLIT = "not column-split"


def fuse_projections(model: Llama, *, release: bool = False) -> Llama:
    """``model`` with q/k/v and gate/up fused wherever their shardings allow (see the module docstring).

    ``release`` deletes each separate array once its fused one exists, so loading peaks at the params plus
    one layer's projections; leave it off when the caller still uses ``model``. A model already fused, or
    one whose shardings allow no fusion, is returned as it is.
    """
    if not isinstance(model, Llama) or model.fused != UNFUSED:
        return model
    first = model.layers[0]
    plan = Fused(
        qkv=_fusable([getattr(first.self_attn, n).kernel[...] for n in _QKV], model.config.num_kv_heads),
        gate_up=_fusable([getattr(first.mlp, n).kernel[...] for n in _GATE_UP], None),
    )
    if plan == UNFUSED:
        return model
    fused = nnx.eval_shape(lambda: Llama(
        model.config, rngs=nnx.Rngs(0), param_dtype=model.embed_tokens.embedding.dtype, fused=plan))
    graphdef, abstract = nnx.split(fused)
    separate = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    kvh = model.config.num_kv_heads
    programs: dict[tuple[str, jax.sharding.Sharding], Any] = {}  # one compile per shape, not per layer

    def build(kind: str, parts: list[jax.Array]) -> jax.Array:
        sharding = _fused_sharding(parts[0], stacked_f=kind == "gate_up_proj")
        if (kind, sharding) not in programs:
            layout = (lambda q, k, v: _qkv_layout(q, k, v, kvh)) if kind == "qkv_proj" else _gate_up_layout
            programs[kind, sharding] = jax.jit(layout, out_shardings=sharding)
        return programs[kind, sharding](*parts)

    values = []
    for path, var in nnx.to_flat_state(abstract):
        module, leaf = path[-2], path[-1]
        if module in ("qkv_proj", "gate_up_proj"):
            names = _QKV if module == "qkv_proj" else _GATE_UP
            parts = [separate[(*path[:-2], name, leaf)][...] for name in names]
            value = build(module, parts)
        else:
            value, parts = separate[path][...], []
        if release:
            jax.block_until_ready(value)
            for part in parts:
                part.delete()
        values.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def separate_params(model: Llama) -> list[tuple[tuple, jax.Array]]:
    """The params of ``model`` as the unfused model's flat state (HF layout), fused or not."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        module, leaf, value = path[-2], path[-1], var[...]
        if module == "qkv_proj":
            group = value.shape[-2] - 2
            lead = value.shape[:-3]
            for name, block in zip(_QKV, jnp.split(value, [group, group + 1], axis=-2), strict=True):
                out.append(((*path[:-2], name, leaf), block.reshape(*lead, -1)))
        elif module == "gate_up_proj":
            out.extend(((*path[:-2], name, leaf), value[..., i, :]) for i, name in enumerate(_GATE_UP))
        else:
            out.append((path, value))
    return out


def _qkv_layout(q: jax.Array, k: jax.Array, v: jax.Array, kvh: int) -> jax.Array:
    """``[..., H * hd]``, ``[..., KVH * hd]`` x 2 -> ``[..., KVH, G + 2, hd]`` (kernels and biases alike)."""
    lead, hd = q.shape[:-1], k.shape[-1] // kvh
    return jnp.concatenate(
        [q.reshape(*lead, kvh, -1, hd), k.reshape(*lead, kvh, 1, hd), v.reshape(*lead, kvh, 1, hd)], axis=-2
    )


def _gate_up_layout(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``[D, F]`` x 2 -> ``[D, 2, F]``."""
    return jnp.stack([gate, up], axis=-2)


def _column_axis(x: jax.Array) -> str | None:
    """The mesh axis that splits ``x``'s last (output) dimension, None when replicated, or a marker when it
    is sharded any other way (then we leave it alone)."""
    sharding = x.sharding
    if sharding.is_fully_replicated:
        return None
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        if all(axis is None for axis in spec[:-1]) and isinstance(spec[-1], str):
            return spec[-1]
    return _NOT_COLUMN_SPLIT


def _fusable(kernels: list[jax.Array], heads: int | None) -> bool:
    """Whether these kernels are placed alike (same devices, split the same way over whole ``heads``)."""
    axes = {_column_axis(k) for k in kernels}
    devices = {frozenset(k.sharding.device_set) for k in kernels}
    if len(axes) != 1 or _NOT_COLUMN_SPLIT in axes or len(devices) != 1:
        return False
    (axis,) = axes
    return axis is None or heads is None or heads % kernels[0].sharding.mesh.shape[axis] == 0


def _fused_sharding(part: jax.Array, *, stacked_f: bool) -> jax.sharding.Sharding:
    """The fused param's sharding from one of its parts': the part's own when replicated, else the same
    mesh axis on the fused param's split dimension: the kv heads of ``[..., KVH, G + 2, hd]``, or F of
    ``[..., 2, F]`` (``stacked_f``)."""
    axis = _column_axis(part)
    if axis is None:
        return part.sharding
    split_dim = part.ndim - 1 + int(stacked_f)  # the part's output dimension, after the stacking axis if any
    return NamedSharding(part.sharding.mesh, PartitionSpec(*([None] * split_dim), axis))
