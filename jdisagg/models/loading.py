"""Getting a ``Llama`` into device memory: from HF safetensors, from our orbax checkpoints, or seeded random.

Every loader builds the module abstractly (``nnx.eval_shape``: shapes only, no memory) and then creates
each param directly in its target sharding, each device reading only its slice, so a model larger than one
device (or than host memory, for the HF path) is never materialised whole anywhere. ``shardings(path,
shape)`` names the sharding of each param by its ``/``-joined path (``layers/0/self_attn/q_proj/kernel``),
the same paths ``jdisagg.meshes.rules`` matches. Without it, params go to the default device.

``load_model`` resolves what a user names (nothing, a directory, a module) into a ``ModelSource``: its
config in the serving dtype, and a ``load(shardings)`` that each replica calls with its own sharding.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.typing import DTypeLike
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jdisagg.models.config import ModelConfig
from jdisagg.models.fused import fuse_projections, separate_params
from jdisagg.models.llama import Llama
from jdisagg.models.naming import IGNORED_SUFFIXES, HFTensor, hf_tensor, keypath_param_path, param_path
from jdisagg.models.safetensors_reader import INDEX_FILE, SINGLE_FILE, SafetensorsReader

if TYPE_CHECKING:
    from jdisagg.tokenizer import Tokenizer

ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]

log = logging.getLogger(__name__)

_STATE_DIR = "state"
_CONFIG_FILE = "config.json"

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved but not yet loaded: its config (in the serving dtype) and how to load its params.

    Every replica calls ``load`` with its own sharding, so each device reads only its slice of each param
    straight from the checkpoint: no device ever holds a whole copy of a param its sharding splits, and no
    replica's params pass through another device first.
    """

    config: Any  # a ModelConfig, or the config of a module brought along
    description: str
    _load: Callable[[ShardingFn | None], nnx.Module]
    owns_params: bool = True  # False for a module brought along: its arrays stay the caller's

    def load(self, shardings: ShardingFn | None = None, *, fuse: bool = False) -> nnx.Module:
        """The params in ``shardings``, in the checkpoint's layout; ``fuse``: with q/k/v and gate/up fused
        into one matmul each where the shardings allow (``jdisagg.models.fused``), the layout to serve."""
        module = self._load(shardings)
        return fuse_projections(module, release=self.owns_params) if fuse else module


def load_model(
    model: Any, tokenizer: Tokenizer | None = None, *, dtype: str = "auto", platform: str | None = None
) -> tuple[ModelSource, Tokenizer]:
    """Resolve ``model``: None (built-in demo), a checkpoint directory, or a ready ``nnx.Module``.

    ``dtype`` is the serving dtype of params and activations (``DTYPES``): ``auto`` is bfloat16 on an
    accelerator and the checkpoint's own dtype on CPU (``platform`` of the serving devices, default JAX's
    default backend). A module brought along serves in its own dtype. Raises ValueError for bad input.
    """
    from jdisagg.models.demo import DEMO_CONFIG, DEMO_DIR
    from jdisagg.tokenizer import ByteTokenizer, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(model, nnx.Module):
        if tokenizer is None:
            raise ValueError("a model passed as a module needs a tokenizer (Engine(model, tokenizer=...))")
        return _module_source(model, dtype), tokenizer
    platform = platform or jax.default_backend()
    if model is None:
        config = _with_dtype(DEMO_CONFIG, serving_dtype(dtype, DEMO_CONFIG.dtype, platform))
        if (DEMO_DIR / SINGLE_FILE).exists():
            return _hf_source(DEMO_DIR, config, "the built-in demo model"), tokenizer or ByteTokenizer()
        log.warning("demo weights %s not found: serving an untrained (random) demo model", DEMO_DIR)
        return ModelSource(config, "a random demo model", lambda shardings: init_model(
            config, 0, shardings=shardings)), tokenizer or ByteTokenizer()
    if not isinstance(model, str | os.PathLike):
        raise ValueError(
            f"model must be None, a checkpoint directory or an nnx.Module, got {type(model).__name__}"
        )
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist")
    stored = ModelConfig.from_hf(path / _CONFIG_FILE)
    config = _with_dtype(stored, serving_dtype(dtype, stored.dtype, platform))
    if (path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists():
        source = _hf_source(path, config, str(path))
    else:
        source = ModelSource(config, str(path), lambda shardings: restore_checkpoint(
            path, shardings=shardings, param_dtype=config.dtype))
    return source, tokenizer or load_tokenizer(path)


def serving_dtype(requested: str, checkpoint: str, platform: str) -> str:
    """``auto`` -> bfloat16 on GPU/TPU (what they are fast at), the checkpoint's dtype on CPU."""
    if requested != "auto":
        return requested
    return checkpoint if platform == "cpu" else "bfloat16"


def _hf_source(path: Path, config: ModelConfig, description: str) -> ModelSource:
    def load(shardings: ShardingFn | None) -> Llama:
        return load_hf_model(path, shardings=shardings, param_dtype=config.dtype, progress=False)

    return ModelSource(config, description, load)


def _module_source(module: nnx.Module, dtype: str) -> ModelSource:
    """A module brought along: each replica gets its own copy of its params, placed in its sharding."""
    graphdef, state = nnx.split(module)
    own = jax.tree.leaves(state)[0].dtype
    if dtype != "auto" and jnp.dtype(dtype) != own:
        raise ValueError(f"a model passed as a module serves in its own dtype ({own}), not {dtype}")

    def load(shardings: ShardingFn | None) -> nnx.Module:
        if shardings is None:
            return module

        def place(keypath: tuple[Any, ...], x: jax.Array) -> jax.Array:
            return jax.device_put(x, shardings(keypath_param_path(keypath), tuple(x.shape)))

        return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(place, state))

    return ModelSource(module.config, type(module).__name__, load, owns_params=False)


def load_hf_model(
    path: str | Path, *, shardings: ShardingFn | None = None, param_dtype: DTypeLike | None = None,
    progress: bool = True,
) -> Llama:
    """Load a HF Llama/Mistral/Qwen2 checkpoint directory (``config.json`` + safetensors).

    ``param_dtype`` overrides the checkpoint's dtype (tensors are cast slice by slice while loading).
    Raises ValueError naming the tensors when the checkpoint and the config disagree.
    """
    path = Path(path)
    config = _with_dtype(ModelConfig.from_hf(path), param_dtype)
    graphdef, flat = _abstract(config)
    reader = SafetensorsReader(path)
    wanted = {param_path(p): hf_tensor(param_path(p)) for p, _ in flat}
    _check_tensors(path, config, wanted, reader)
    arrays = []
    bar = tqdm(flat, desc="loading weights", unit="tensor", disable=not progress or not sys.stderr.isatty())
    for p, var in bar:
        name = param_path(p)
        sharding = shardings(name, var.shape) if shardings else None
        arrays.append(_load_tensor(reader, wanted[name], var.shape, var.dtype, sharding))
    return _assemble(graphdef, flat, arrays)


def save_hf_safetensors(model: Llama, directory: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` in HF naming (read by transformers, ``load_hf_model``).

    This is the format training scripts should produce (e.g. the demo weights).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, dtype = {}, None
    for p, array in separate_params(model):
        target = hf_tensor(param_path(p))
        value = np.asarray(jax.device_get(array))
        tensors[target.name] = np.ascontiguousarray(value.T if target.transpose else value)
        dtype = value.dtype
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    _write_config(_with_dtype(model.config, dtype), directory)


def save_checkpoint(model: Llama, path: str | Path) -> None:
    """Save params with orbax under ``path/state`` and the HF-format ``config.json`` next to them."""
    path = Path(path).absolute()
    params = dict(separate_params(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / _STATE_DIR, _nested(params), force=True)
    _write_config(_with_dtype(model.config, next(iter(params.values())).dtype), path)


def restore_checkpoint(
    path: str | Path, *, shardings: ShardingFn | None = None, param_dtype: DTypeLike | None = None
) -> Llama:
    """Restore a ``save_checkpoint`` directory, each param read straight into its sharding.

    ``param_dtype`` overrides the saved dtype (orbax casts each shard as it reads it).
    """
    path = Path(path).absolute()
    config = _with_dtype(ModelConfig.from_hf(path / _CONFIG_FILE), param_dtype)
    graphdef, flat = _abstract(config)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = _nested({
        p: jax.ShapeDtypeStruct(
            var.shape, var.dtype, sharding=shardings(param_path(p), var.shape) if shardings else default
        )
        for p, var in flat
    })
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path / _STATE_DIR, target)
    return _assemble(graphdef, flat, [_lookup(restored, p) for p, _ in flat])


def init_model(config: ModelConfig, seed: int, *, shardings: ShardingFn | None = None) -> Llama:
    """Seeded random params, identical whatever ``shardings`` is.

    Linear kernels are ``N(0, 1/fan_in)`` and embeddings ``N(0, 1)``, so activations and logits stay O(1)
    at any width: a random model's logits are spread enough that greedy decoding is not a string of
    near-ties (which would make sharded and unsharded runs disagree on rounding noise). Sampled on the
    host with numpy: compiling a random-number program per shape costs seconds, and this init only
    serves tests and the demo fallback, whose params fit in host memory.
    """
    graphdef, flat = _abstract(config)
    arrays = []
    for i, (p, var) in enumerate(flat):
        name = param_path(p)
        value = _sample(np.random.default_rng([seed, i]), name, var.shape, var.dtype)
        arrays.append(_place(var.shape, shardings(name, var.shape) if shardings else None, value.__getitem__))
    return _assemble(graphdef, flat, arrays)


def _sample(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """One param's init: norms start at 1, biases at 0, embeddings N(0, 1), kernels N(0, 1/fan_in)."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "scale":
        return np.ones(shape, dtype)
    if leaf == "bias":
        return np.zeros(shape, dtype)
    std = 1.0 if leaf == "embedding" else shape[0] ** -0.5
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def _abstract(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.FlatState]:
    """The module's structure and its params' shapes/dtypes, without allocating anything."""
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_flat_state(state)


def _assemble(graphdef: nnx.GraphDef, flat: nnx.FlatState, arrays: list[jax.Array]) -> Llama:
    state = nnx.from_flat_state([(p, var.replace(a)) for (p, var), a in zip(flat, arrays, strict=True)])
    return nnx.merge(graphdef, state)


def _with_dtype(config: ModelConfig, dtype: DTypeLike | None) -> ModelConfig:
    return config if dtype is None else dataclasses.replace(config, dtype=jnp.dtype(dtype).name)


def _write_config(config: ModelConfig, directory: Path) -> None:
    (directory / _CONFIG_FILE).write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")


def _check_tensors(
    path: Path, config: ModelConfig, wanted: dict[str, HFTensor], reader: SafetensorsReader
) -> None:
    """Fail with every missing / unexpected / mis-shaped tensor named, before anything is loaded."""
    expected = {t.name for t in wanted.values()}
    found = reader.names()
    ignorable = {n for n in found if n.endswith(IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    problems = []
    if missing := sorted(expected - found):
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected := sorted(found - expected - ignorable):
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} does not match its {config.model_type} config: "
                         + "; ".join(problems))


def _few(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_tensor(
    reader: SafetensorsReader, tensor: HFTensor, shape: tuple[int, ...], dtype: Any,
    sharding: jax.sharding.Sharding | None,
) -> jax.Array:
    """One param, each device reading only its own slice of the file."""
    stored = reader.shape(tensor.name)
    if stored != (shape[::-1] if tensor.transpose else shape):
        raise ValueError(f"tensor {tensor.name!r} has shape {stored}, the config implies "
                         f"{shape[::-1] if tensor.transpose else shape}")

    def read(index: tuple[slice, ...]) -> np.ndarray:
        # One copy out of the memory map (never aliased: the file may go away), cast and transposed.
        if tensor.transpose:
            return np.array(reader.read(tensor.name, index[::-1]).T, dtype=dtype, order="C")
        return np.array(reader.read(tensor.name, index), dtype=dtype, order="C")

    return _place(shape, sharding, read)


def _place(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding | None,
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
    """A device array whose devices each get ``read(their index)``; no sharding: the default device."""
    if sharding is None:
        return jax.device_put(read(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def _nested(flat: dict[tuple, Any]) -> dict[str, Any]:
    """``{("layers", 0, "mlp", ...): x}`` -> nested dicts with string keys (what orbax stores)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def _lookup(tree: dict[str, Any], path: tuple) -> Any:
    for part in path:
        tree = tree[str(part)]
    return tree
