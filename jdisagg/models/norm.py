"""RMSNorm with the Hugging Face numerics: normalise in float32, cast back, then multiply by ``scale``.

Our own module rather than ``nnx.RMSNorm`` because the order of the cast and the product decides bf16
parity with HF, and the param must be called ``scale`` for the sharding rules and the loader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike


class RMSNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float, param_dtype: DTypeLike = jnp.float32) -> None:
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)
