"""Our param paths (``layers/0/self_attn/q_proj/kernel``) <-> Hugging Face tensor names.

Both directions live here so the loader and the safetensors writer cannot drift apart. HF Linear weights
are ``[out, in]``; ours are ``[in, out]``, hence the transpose flag.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Buffers some older checkpoints carry that are derived from the config, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFTensor(NamedTuple):
    name: str
    transpose: bool


def param_path(path: tuple[str | int, ...]) -> str:
    """An nnx state path as the ``/``-joined string the sharding rules match."""
    return "/".join(str(part) for part in path)


def keypath_param_path(keypath: tuple[Any, ...]) -> str:
    """The same string from a pytree key path of an nnx.State (``jax.tree_util.tree_map_with_path``)."""
    parts: list[str | int] = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(key.idx)
    return param_path(tuple(parts))


def hf_tensor(path: str) -> HFTensor:
    """The HF tensor that holds our param ``path``, and whether it is stored transposed."""
    *modules, leaf = path.split("/")
    if leaf not in _LEAF:
        raise ValueError(f"param {path!r} has no Hugging Face counterpart")
    prefix = "" if modules[0] == "lm_head" else "model."
    return HFTensor(prefix + ".".join(modules) + "." + _LEAF[leaf], transpose=leaf == "kernel")
