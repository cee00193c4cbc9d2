"""Rotary position embeddings in the Hugging Face convention, so HF checkpoints load without permuting q/k.

HF rotates the two *halves* of each head (``rotate_half``), not interleaved pairs, and computes the inverse
frequencies in float32; llama3 and linear scaling only change those frequencies. The frequencies are a
trace-time numpy constant: they depend on the config alone, never on the data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """``[head_dim // 2]`` float32 inverse frequencies, scaled as the config's ``rope_scaling`` says."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    return _llama3(inv_freq, scaling)


def _llama3(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` ``[..., heads, head_dim]`` by ``positions`` ``[...]`` (broadcast over heads).

    The angles are computed in float32 and cast to ``x``'s dtype before the product, as HF does.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
