"""Token sampling inside the compiled programs: greedy, temperature, top-k, top-p, per-request seeds.

Sampling runs on device as part of prefill and decode, so only one int32 per sequence crosses to the host
each step. The key of a token is ``fold_in(key(seed), position)``: a request samples the same tokens
whatever else is in its batch, and a preempted sequence recomputed later continues exactly where it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(
    logits: jax.Array,  # [B, V] float32
    temperature: jax.Array,  # [B] float32; 0 = greedy
    top_k: jax.Array,  # [B] int32; 0 = off
    top_p: jax.Array,  # [B] float32; 1 = off
    seeds: jax.Array,  # [B] uint32
    positions: jax.Array,  # [B] int32, the position the sampled token will take
    forced: jax.Array,  # [B] int32; >= 0 takes that token instead of sampling (teacher forcing, scoring)
) -> tuple[jax.Array, jax.Array]:
    """One token id per row ``[B] int32``, and its log-probability under the model ``[B] float32``.

    The log-probability is of the unscaled model distribution (temperature and filters are how we pick, not
    what the model says), so forced tokens give exactly the model's likelihood of a given continuation.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    ranks = jnp.arange(vocab)[None, :]
    keep = ranks < jnp.where(top_k > 0, top_k, vocab)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < top_p[:, None])  # the most likely token is always kept
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    tokens = jnp.where(forced >= 0, forced, jnp.where(temperature > 0, sampled, greedy))
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
