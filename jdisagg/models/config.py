"""The model hyper-parameters jdisagg needs, read from (and written back to) a Hugging Face ``config.json``.

One frozen dataclass for the whole Llama family (Llama, Mistral, Qwen2): the families differ only in
q/k/v bias, tied embeddings, rope scaling and sliding-window attention, so a field each is cheaper than a
class each. Parsing accepts
both the transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x one (``rope_parameters``),
and rejects anything the model code would silently get wrong (other activations, biases, rope types).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    ``rope_scaling`` is the HF dict with a ``rope_type`` key (``"llama3"`` or ``"linear"``), or None for
    plain rope. ``attention_bias`` means bias on q/k/v only (Qwen2); o_proj never has one.
    ``sliding_window`` (Mistral, Qwen2 with ``use_sliding_window``): a token attends to itself and the
    ``sliding_window - 1`` tokens before it, in the layers ``sliding_window_layers`` (None: every layer;
    Qwen2 windows only the layers from ``max_window_layers`` on). See ``attention_window``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; supported {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is no multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; supported: {_DTYPES}")
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") not in ("llama3", "linear"):
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling!r}; supported: llama3, linear")
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
            if self.model_type == "llama":
                raise ValueError("sliding_window needs model_type mistral or qwen2 (HF Llama has none)")
        layers = self.sliding_window_layers or ()
        if layers and self.model_type != "qwen2":
            raise ValueError("sliding_window_layers (a window in some layers only) is Qwen2's; "
                             f"{self.model_type} windows every layer")
        if any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"sliding_window_layers {layers} are not all in [0, {self.num_layers})")

    def attention_window(self, layer: int) -> int | None:
        """How many tokens (the current one included) layer ``layer`` attends to; None: the whole context."""
        if self.sliding_window_layers is not None and layer not in self.sliding_window_layers:
            return None
        return self.sliding_window

    def __hash__(self) -> int:
        # rope_scaling is a dict, so the generated hash would fail; the module's graphdef (a jit static
        # argument) hashes its config.
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        return hash(tuple(scaling if f.name == "rope_scaling" else getattr(self, f.name)
                          for f in fields(self)))

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> ModelConfig:
        """Parse a HF config: a model directory, a ``config.json`` path, or the already-loaded dict."""
        if isinstance(path_or_dict, dict):
            cfg = path_or_dict
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            cfg = json.loads(path.read_text())
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only silu is supported")
        if cfg.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if model_type == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v bias; its config has no key for it
        elif cfg.get("attention_bias", False):
            raise ValueError(f"attention_bias=True ({model_type}) also biases o_proj, which is unsupported")
        else:
            attention_bias = False

        rope_theta, rope_scaling = _parse_rope(cfg)
        num_heads = cfg["num_attention_heads"]
        max_positions = cfg.get("max_position_embeddings", 2048)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
            dtype=_parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype")),
            **_parse_sliding_window(cfg, max_positions),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict for this model type that transformers 4.x and 5.x both accept.

        Rope is written in both layouts (``rope_theta``/``rope_scaling`` and ``rope_parameters``) so either
        transformers major version reads it without conversion.
        """
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        cfg: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            windowed = [self.attention_window(i) is not None for i in range(self.num_layers)]
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
            # Both spellings: transformers 5 reads layer_types, 4.x only max_window_layers (a suffix).
            cfg["max_window_layers"] = windowed.index(True) if any(windowed) else self.num_layers
            cfg["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windowed]
        return cfg


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from either transformers layout; plain rope gives None scaling."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return rope_theta, None
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [k for k in keys[rope_type] if k not in params]
    if missing:
        raise ValueError(f"rope type {rope_type!r} is missing {missing}")
    return rope_theta, {"rope_type": rope_type, **{k: params[k] for k in keys[rope_type]}}


def _parse_sliding_window(cfg: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """``sliding_window`` and ``sliding_window_layers``, as transformers applies them.

    Mistral windows every layer. Qwen2 windows only with ``use_sliding_window``, and then only the layers
    ``layer_types`` marks ``sliding_attention`` (transformers 5), else those from ``max_window_layers`` on.
    A window covering every position changes nothing and is dropped.
    """
    none = {"sliding_window": None, "sliding_window_layers": None}
    window = cfg.get("sliding_window")
    if window is None or window >= max_positions or cfg.get("model_type", "llama") == "llama":
        return none
    if cfg.get("model_type") != "qwen2":
        return {"sliding_window": window, "sliding_window_layers": None}
    if not cfg.get("use_sliding_window", False):
        return none
    num_layers = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        layers = tuple(i for i, kind in enumerate(cfg["layer_types"]) if kind == "sliding_attention")
    else:
        layers = tuple(range(cfg.get("max_window_layers", 28), num_layers))
    if not layers:
        return none
    return {"sliding_window": window, "sliding_window_layers": None if len(layers) == num_layers else layers}


def _parse_dtype(name: str | None) -> str:
    name = (name or "float32").removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {_DTYPES}")
    return name


def _as_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)
