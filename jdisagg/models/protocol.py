"""What the engine needs from a model: the contract for bringing your own Flax model.

The engine never looks inside a model. It reads a few sizes from ``model.config`` (to lay out the paged KV
cache and check that heads divide over tensor parallelism) and calls four pure-traceable methods, each
compiled as its own XLA program. Any ``nnx.Module`` with these members serves; ``jdisagg.models.Llama``
is the built-in one. Params are sharded by the rules in ``jdisagg.meshes.rules``, matched against the
``/``-joined param paths, so a new architecture adds rules there rather than code in the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import jax

C = TypeVar("C")


class ServingConfig(Protocol):
    """The sizes the engine reads; ``eos_token_ids`` are added to the tokenizer's own stop ids."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]


class ServingModel(Protocol):
    """A causal LM the engine can serve with disaggregated prefill and decode.

    Shapes: B batch, T tokens, D hidden, H query heads, KVH kv heads, hd head_dim, V vocab.
    """

    config: ServingConfig

    def prefill(
        self, tokens: jax.Array, positions: jax.Array
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """Causal forward: int32 ``[B, T]`` -> hidden ``[B, T, D]``, per layer (k, v) ``[B, T, KVH, hd]``.

        Token i attends to tokens j <= i of its row (rows are padded at the end; a sliding-window layer only
        to the last ``window`` of them). k is after rope: the engine stores these in the cache and ``decode``
        attends to them unchanged.
        """
        ...

    def prefill_chunk(
        self, tokens: jax.Array, positions: jax.Array, caches: list[C],
        attend: Callable[[jax.Array, jax.Array, jax.Array, C], tuple[jax.Array, C]],
    ) -> tuple[jax.Array, list[C]]:
        """Part of a long prompt: int32 ``[B, T]`` at ``[B, T]`` -> hidden ``[B, T, D]`` and new caches.

        The engine prefills a prompt longer than its chunk length chunk by chunk through this. As in
        ``decode``, for layer i the model calls ``out, caches[i] = attend(q [B, T, H, hd], k [B, T, KVH, hd],
        v [B, T, KVH, hd], caches[i], window=w)``; the engine's ``attend`` stores k/v and returns ``out
        [B, T, H, hd]``, causal attention over the earlier chunks' positions and the chunk's own (the last
        ``w`` positions only when ``w`` is not None). ``hidden`` is what ``prefill`` returns for these tokens.
        """
        ...

    def decode(
        self, tokens: jax.Array, positions: jax.Array, caches: list[C],
        attend: Callable[[jax.Array, jax.Array, jax.Array, C], tuple[jax.Array, C]],
    ) -> tuple[jax.Array, list[C]]:
        """One token per sequence: int32 ``[B]`` at ``[B]`` -> float32 logits ``[B, V]`` and new caches.

        For layer i the model calls ``out, caches[i] = attend(q [B, H, hd], k [B, KVH, hd], v [B, KVH, hd],
        caches[i], window=w)`` (q, k after rope; ``window`` may be left out, meaning None); the engine's
        ``attend`` stores k/v and returns ``out [B, H, hd]``, attention over positions ``0..positions`` (only
        the last ``w`` of them when ``w`` is not None, for sliding-window layers) with scale
        ``head_dim ** -0.5``.
        """
        ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``prefill``'s hidden ``[..., D]`` -> float32 logits ``[..., V]`` (including any final norm)."""
        ...
