"""The oracle engine tests compare against: greedy continuation by a dense, unpaged forward on one device
that recomputes the whole sequence for every token (no KV cache, no pages, no hand-off)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdisagg.models import load_hf_model


def dense_greedy(checkpoint: Path, max_context: int) -> Callable[[tuple[int, ...], int], list[int]]:
    """``generate(prompt, n)``: the checkpoint's next ``n`` greedy tokens after ``prompt`` (memoized)."""
    graphdef, state = nnx.split(load_hf_model(checkpoint))

    @jax.jit
    def next_token(state, tokens, length):
        logits = nnx.merge(graphdef, state)(tokens[None], jnp.arange(max_context, dtype=jnp.int32)[None])
        return jnp.argmax(logits[0, length - 1])

    @functools.cache
    def generate(prompt: tuple[int, ...], n: int) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            padded = np.zeros(max_context, np.int32)
            padded[: len(ids)] = ids
            ids.append(int(next_token(state, padded, len(ids))))
        return ids[len(prompt) :]

    return generate
