"""The Llama-family decoder (Llama, Mistral, Qwen2) in ``flax.nnx``, split as disaggregated serving runs it.

``prefill`` is the dense causal forward over a prompt and hands back every layer's k/v; ``prefill_chunk``
(a chunk of a long prompt over the KV of the chunks before it) and ``decode`` (one token per sequence) leave
the KV cache and the attention to the caller through ``attend``, so the same weights serve a paged cache, a
dense per-prompt buffer, a test cache, or any kernel the engine picks. All three run one layer loop.

Conventions:
- ``prefill`` and ``decode`` work on the residual stream *before* the final norm; ``logits`` applies the
  final norm and the LM head. So ``logits(prefill(...)[0])`` are the full logits.
- Attribute names mirror HF (``layers/0/self_attn/q_proj/kernel``): the sharding rules and the loader
  match these paths. Linear kernels are ``[in, out]`` (HF weights transposed).
- Serving fuses q/k/v and gate/up into one matmul each (``fused=True``, built from the separate weights by
  ``jdisagg.models.fused``): at decode's small batches every projection is a memory-bound GEMV, and one
  launch per layer reading one matrix beats three (or two) reading slices of it. Checkpoints, the sharding
  rules and training keep the HF layout (``fused=False``).
- RMSNorm statistics, attention scores and softmax are float32; everything else runs in the param dtype.
- Sliding-window configs (Mistral, Qwen2) attend, in their windowed layers, to the last
  ``config.attention_window(layer)`` tokens only: prefill masks the rest, decode passes the window to
  ``attend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from jdisagg.models.config import ModelConfig
from jdisagg.models.norm import RMSNorm
from jdisagg.models.rope import apply_rope, inverse_frequencies

C = TypeVar("C")
Attend = Callable[..., tuple[jax.Array, C]]  # (q, k, v, cache, *, window) -> (out, cache)


class Fused(NamedTuple):
    """Which projections run as one matmul: q/k/v (``qkv``) and gate/up (``gate_up``)."""

    qkv: bool
    gate_up: bool


UNFUSED = Fused(qkv=False, gate_up=False)


def _linear(
    in_features: int, out_features: int, *, bias: bool, dtype: DTypeLike, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class QKVProjection(nnx.Module):
    """q, k and v in one matmul: ``kernel [D, KVH, G + 2, hd]`` holds, for each kv head, its G = H / KVH
    query heads, then its k head, then its v head (``bias [KVH, G + 2, hd]``).

    Grouped by kv head, so splitting the KVH axis over tensor parallelism gives each device the query heads
    and the kv head they read, exactly as the separate q/k/v column splits do: the layout does not depend
    on ``tp``. Values come from ``jdisagg.models.fused``; the zeros here only give the shapes.
    """

    def __init__(self, d: int, kvh: int, group: int, hd: int, *, bias: bool, dtype: DTypeLike) -> None:
        self.group = group
        self.kernel = nnx.Param(jnp.zeros((d, kvh, group + 2, hd), dtype))
        self.bias = nnx.Param(jnp.zeros((kvh, group + 2, hd), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [..., D]`` -> q ``[..., H, hd]`` (head ``k * G + g`` as in HF), k, v ``[..., KVH, hd]``."""
        y = jnp.einsum("...d,dkgh->...kgh", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        q = y[..., : self.group, :]
        return q.reshape(*q.shape[:-3], -1, q.shape[-1]), y[..., self.group, :], y[..., self.group + 1, :]


class GateUpProjection(nnx.Module):
    """gate and up in one matmul: ``kernel [D, 2, F]`` (gate, then up). Splitting F over tensor parallelism
    keeps each device's gate and up columns together, as the separate column splits do."""

    def __init__(self, d: int, f: int, *, dtype: DTypeLike) -> None:
        self.kernel = nnx.Param(jnp.zeros((d, 2, f), dtype))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = jnp.einsum("...d,dtf->...tf", x, self.kernel[...])
        return y[..., 0, :], y[..., 1, :]


class Attention(nnx.Module):
    """q/k/v/o projections; the attending is done by the caller (dense in prefill, ``attend`` in decode).

    ``fused``: q/k/v as one ``qkv_proj`` (``QKVProjection``) instead of ``q_proj``, ``k_proj``, ``v_proj``.
    """

    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, rngs: nnx.Rngs, fused: bool = False) -> None:
        d, h, kvh, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, hd
        if fused:
            self.qkv_proj = QKVProjection(d, kvh, h // kvh, hd, bias=config.attention_bias, dtype=dtype)
        else:
            self.q_proj = _linear(d, h * hd, bias=config.attention_bias, dtype=dtype, rngs=rngs)
            self.k_proj = _linear(d, kvh * hd, bias=config.attention_bias, dtype=dtype, rngs=rngs)
            self.v_proj = _linear(d, kvh * hd, bias=config.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = _linear(h * hd, d, bias=False, dtype=dtype, rngs=rngs)

    def qkv(
        self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [..., D]`` -> q ``[..., H, hd]``, k, v ``[..., KVH, hd]``; q and k rotated to ``positions``."""
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x)
        else:
            lead = x.shape[:-1]
            q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def out(self, attended: jax.Array) -> jax.Array:
        """``[..., H, hd]`` -> ``[..., D]``."""
        return self.o_proj(attended.reshape(*attended.shape[:-2], self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SiLU-gated feed-forward: ``down(silu(gate(x)) * up(x))``; ``fused``: gate and up as one
    ``gate_up_proj`` (``GateUpProjection``)."""

    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, rngs: nnx.Rngs, fused: bool = False) -> None:
        d, f = config.hidden_size, config.intermediate_size
        if fused:
            self.gate_up_proj = GateUpProjection(d, f, dtype=dtype)
        else:
            self.gate_proj = _linear(d, f, bias=False, dtype=dtype, rngs=rngs)
            self.up_proj = _linear(d, f, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(f, d, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm block, split around the attention so prefill and decode can attend differently."""

    def __init__(self, config: ModelConfig, *, dtype: DTypeLike, rngs: nnx.Rngs, fused: Fused) -> None:
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs, fused=fused.qkv)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype
        )
        self.mlp = MLP(config, dtype=dtype, rngs=rngs, fused=fused.gate_up)

    def qkv(
        self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.self_attn.qkv(self.input_layernorm(x), positions, inv_freq)

    def finish(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        """Residual stream after this layer, from its input ``x`` and attention output ``[..., H, hd]``."""
        x = x + self.self_attn.out(attended.astype(x.dtype))
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None = None) -> jax.Array:
    """Dense causal GQA: q ``[B, T, H, hd]``, k/v ``[B, T, KVH, hd]`` -> ``[B, T, H, hd]``.

    Token i attends to tokens j <= i of its row (and, with a sliding ``window``, only to j > i - window), so
    padding at the end of a row never reaches real tokens.
    Query head h reads kv head ``h // (H // KVH)``: the grouped reshape below is that mapping without
    materialising repeated k/v.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    grouped = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * hd**-0.5
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    causal = j <= i if window is None else (j <= i) & (j > i - window)
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, hd)


class Llama(nnx.Module):
    """Llama-family causal LM implementing ``jdisagg.models.protocol.ServingModel``.

    ``param_dtype`` defaults to ``config.dtype``; activations run in the param dtype. ``fused`` says which
    projections are one matmul (``jdisagg.models.fused.fuse_projections`` builds such a model).
    """

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype: DTypeLike | None = None,
        fused: Fused = UNFUSED,
    ) -> None:
        dtype = jnp.dtype(config.dtype if param_dtype is None else param_dtype)
        self.config = config
        self.fused = fused
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs, fused=fused) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else _linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Dense causal forward: tokens, positions ``[B, T]`` -> float32 logits ``[B, T, V]``."""
        hidden, _ = self.prefill(tokens, positions)
        return self.logits(hidden)

    def prefill(
        self, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Causal forward over ``[B, T]`` -> pre-final-norm hidden ``[B, T, D]`` and per-layer (k, v).

        k (after rope) and v are ``[B, T, KVH, hd]``: exactly what ``decode``'s ``attend`` must see again.
        """

        def dense(q, k, v, cache, window=None):
            return causal_attention(q, k, v, window), (k, v)

        return self.prefill_chunk(tokens, positions, [None] * len(self.layers), dense)

    def prefill_chunk(
        self, tokens: jax.Array, positions: jax.Array, caches: list[C], attend: Attend
    ) -> tuple[jax.Array, list[C]]:
        """Tokens ``[B, T]`` at ``positions`` attending through ``attend``: pre-final-norm hidden
        ``[B, T, D]`` and the updated caches. A long prompt runs chunk by chunk this way, each chunk
        attending to the cache of the chunks before it.

        Per layer, ``attend(q [B, T, H, hd], k [B, T, KVH, hd], v [B, T, KVH, hd], cache, window=w)`` stores
        k/v and returns ``[B, T, H, hd]``: causal attention over every earlier position and the chunk's own
        (only the last ``w`` positions when ``w`` is not None; scale ``head_dim ** -0.5``), and the new cache.
        """
        return self._layers(tokens, positions, caches, attend)

    def decode(
        self, tokens: jax.Array, positions: jax.Array, caches: list[C], attend: Attend
    ) -> tuple[jax.Array, list[C]]:
        """One token per sequence: tokens, positions ``[B]`` -> float32 logits ``[B, V]`` and updated caches.

        Per layer, ``attend(q [B, H, hd], k [B, KVH, hd], v [B, KVH, hd], cache, window=w)`` must store k/v
        at ``positions`` and return the attention output ``[B, H, hd]`` over positions ``0..positions``
        (only the last ``w`` of them when ``w`` is not None; scale ``head_dim ** -0.5``) together with the
        new cache.
        """
        hidden, caches = self._layers(tokens, positions, caches, attend)
        return self.logits(hidden), caches

    def _layers(
        self, tokens: jax.Array, positions: jax.Array, caches: list[C], attend: Attend
    ) -> tuple[jax.Array, list[C]]:
        """The decoder stack with attention left to ``attend``: one loop for prefill, chunks and decode."""
        inv_freq = inverse_frequencies(self.config)
        x = self.embed_tokens(tokens)
        new_caches = []
        for i, (layer, cache) in enumerate(zip(self.layers, caches, strict=True)):
            q, k, v = layer.qkv(x, positions, inv_freq)
            attended, cache = attend(q, k, v, cache, window=self.config.attention_window(i))
            x = layer.finish(x, attended)
            new_caches.append(cache)
        return x, new_caches

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head (the embedding transposed when tied): ``[..., D]`` -> float32 ``[..., V]``."""
        normed = self.norm(hidden)
        if self.lm_head is None:
            # Contract the embedding's own feature axis: ``Embed.attend``'s ``embedding.T`` is a transpose of
            # the whole [V, D] table in the program, which a backend may materialise every step.
            return jnp.einsum("...d,vd->...v", normed, self.embed_tokens.embedding[...]).astype(jnp.float32)
        return self.lm_head(normed).astype(jnp.float32)
