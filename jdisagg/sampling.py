"""Token sampling inside the compiled programs: greedy, temperature, top-k, top-p, per-request seeds.

Sampling runs on device as part of prefill and decode, so only a few numbers per sequence cross to the host
each step. It costs what the batch asks for, and never sorts the vocabulary:

- a batch of greedy rows is one ``argmax`` (the random path is skipped with ``lax.cond``);
- temperature alone is inverse-CDF sampling over the vocabulary in token-id order, two-level (block sums,
  then one block) so no full-length scan runs;
- top-k / top-p only move a per-row *threshold*: the row keeps every token whose scaled logit is at least the
  threshold, then samples like temperature alone. The threshold comes from ``lax.top_k`` over a bounded
  candidate set when the filtered set fits in it (top-k <= candidates, or a nucleus inside the candidates'
  mass) and otherwise from an exact bisection over the float ordering (32 masked sums over the vocabulary).
  Both give the same threshold, so a row samples the same token whichever path its batch took.

The random number of a token is ``uniform(fold_in(key(seed), position))``: a request samples the same tokens
whatever else is in its batch, and a preempted sequence recomputed later continues exactly where it was.
Tokens tied at the threshold are all kept (the sort-based definition would keep an arbitrary subset of them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdisagg.sampling_params import TOP_LOGPROBS

CANDIDATES = 64  # top-k / top-p candidates taken with lax.top_k before the exact fallback
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows the logits)
_BLOCK = 256  # inverse-CDF block length


class Sampled(NamedTuple):
    """What sampling returns per row: the token, its logprob, and the most likely alternatives."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, of the unscaled model distribution
    top_ids: jax.Array  # [B, TOP_LOGPROBS] int32, most likely first (zeros when no row asked)
    top_logprobs: jax.Array  # [B, TOP_LOGPROBS] float32


def sample_tokens(
    logits: jax.Array,  # [B, V]
    temperature: jax.Array,  # [B] float32; 0 = greedy
    top_k: jax.Array,  # [B] int32; 0 = off
    top_p: jax.Array,  # [B] float32; 1 = off
    seeds: jax.Array,  # [B] uint32
    positions: jax.Array,  # [B] int32, the position the sampled token will take
    forced: jax.Array,  # [B] int32; >= 0 takes that token instead of sampling (teacher forcing, scoring)
    num_top: jax.Array,  # [B] int32; > 0: return the most likely alternatives of this row's token
    *,
    candidates: int = CANDIDATES,
) -> Sampled:
    """One token per row, its log-probability under the model, and (when asked) the top alternatives.

    Log-probabilities are of the unscaled model distribution (temperature and filters are how we pick, not
    what the model says), so forced tokens give exactly the model's likelihood of a given continuation.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature >= GREEDY_BELOW
    sampled = jax.lax.cond(
        jnp.any(sampling & (forced < 0)),
        lambda: _sample(logits, temperature, top_k, top_p, seeds, positions, candidates),
        lambda: greedy,
    )
    tokens = jnp.where(forced >= 0, forced, jnp.where(sampling, sampled, greedy))
    normalizer = jax.nn.logsumexp(logits, axis=-1)
    logprobs = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normalizer

    def top_alternatives() -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(logits, min(TOP_LOGPROBS, logits.shape[-1]))
        pad = ((0, 0), (0, TOP_LOGPROBS - ids.shape[-1]))  # a vocabulary smaller than the bound
        return jnp.pad(ids.astype(jnp.int32), pad), jnp.pad(values - normalizer[:, None], pad)

    batch = logits.shape[0]
    top_ids, top_lps = jax.lax.cond(
        jnp.any(num_top > 0),
        top_alternatives,
        lambda: (jnp.zeros((batch, TOP_LOGPROBS), jnp.int32), jnp.zeros((batch, TOP_LOGPROBS), jnp.float32)),
    )
    return Sampled(tokens, logprobs, top_ids, top_lps)


def _sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
    candidates: int,
) -> jax.Array:
    scaled = logits / jnp.maximum(temperature, GREEDY_BELOW)[:, None]
    vocab = scaled.shape[-1]
    top_k = jnp.where(top_k >= vocab, 0, top_k)  # keeping the whole vocabulary is no filter
    filtered = (top_k > 0) | (top_p < 1.0)
    keys = _order_keys(scaled)
    threshold = jax.lax.cond(
        jnp.any(filtered),
        lambda: jnp.where(filtered, _thresholds(scaled, keys, top_k, top_p, candidates), 0),
        lambda: jnp.zeros(scaled.shape[:1], jnp.uint32),
    )
    weights = jnp.where(keys >= threshold[:, None], jnp.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    uniform = jax.vmap(lambda s, p: jax.random.uniform(jax.random.fold_in(jax.random.key(s), p)))
    return _inverse_cdf(weights, uniform(seeds, positions))


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values (the radix-sort trick), so thresholds compare
    exactly and bisect over integers."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _thresholds(
    scaled: jax.Array, keys: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int
) -> jax.Array:
    """Per row, the order key of the smallest kept logit: from the candidates where the filtered set fits
    in them, else from the exact bisection (only run when some row needs it)."""
    candidates = min(candidates, scaled.shape[-1])
    values, _ = jax.lax.top_k(scaled, candidates)
    ranks = jnp.arange(candidates)[None, :]
    in_top_k = (top_k[:, None] == 0) | (ranks < top_k[:, None])
    # Normalise over the top-k set when there is one (it lies in the candidates when top_k <= candidates),
    # else over the whole vocabulary.
    normalizer = jnp.where(
        (top_k > 0) & (top_k <= candidates),
        jax.nn.logsumexp(jnp.where(in_top_k, values, -jnp.inf), axis=-1),
        jax.nn.logsumexp(scaled, axis=-1),
    )
    mass = jnp.cumsum(jnp.where(in_top_k, jnp.exp(values - normalizer[:, None]), 0.0), axis=-1)
    # The nucleus ends at the first candidate whose cumulative mass reaches top_p (the top-k set's last
    # candidate when top_p is off or is never reached inside it).
    reached = (mass >= top_p[:, None]) & (top_p[:, None] < 1.0)
    last_kept = jnp.where(top_k > 0, jnp.minimum(top_k, candidates) - 1, candidates - 1)
    end = jnp.minimum(jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), last_kept), last_kept)
    from_candidates = _order_keys(jnp.take_along_axis(values, end[:, None], axis=-1)[:, 0])
    fits = jnp.where(top_k > 0, top_k <= candidates, reached.any(-1) | (top_p >= 1.0))
    return jax.lax.cond(
        jnp.all(fits),
        lambda: from_candidates,
        lambda: jnp.where(fits, from_candidates, _bisect_thresholds(scaled, keys, top_k, top_p)),
    )


def _largest_key(keys: jax.Array, holds) -> jax.Array:
    """Per row, the largest uint32 key ``t`` for which ``holds(t)`` (monotone: true up to some key) is true;
    ``holds`` is true at 0. 32 halvings of the key range."""
    lo = jnp.zeros(keys.shape[:1], jnp.uint32)
    hi = keys.max(-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = holds(mid) & (lo < hi)
        return jnp.where(ok, mid, lo), jnp.where(ok | (lo >= hi), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _bisect_thresholds(scaled: jax.Array, keys: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The exact thresholds by bisection: the k-th largest key, then the nucleus inside the top-k set."""
    k_key = jax.lax.cond(
        jnp.any(top_k > 0),
        lambda: jnp.where(
            top_k > 0,
            _largest_key(keys, lambda t: (keys >= t[:, None]).sum(-1) >= top_k),
            0,
        ),
        lambda: jnp.zeros(keys.shape[:1], jnp.uint32),
    )
    in_top_k = keys >= k_key[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)

    def nucleus_holds(t: jax.Array) -> jax.Array:
        return jnp.where(keys >= t[:, None], probs, 0.0).sum(-1) >= top_p

    p_key = jax.lax.cond(
        jnp.any(top_p < 1.0),
        lambda: jnp.where(top_p < 1.0, _largest_key(keys, nucleus_holds), 0),
        lambda: jnp.zeros(keys.shape[:1], jnp.uint32),
    )
    return jnp.maximum(k_key, p_key)


def _inverse_cdf(weights: jax.Array, rng: jax.Array) -> jax.Array:
    """Per row, the token whose slot of the cumulative (unnormalised) weights holds ``rng`` x total, in
    token-id order. Two levels: cumulative block sums pick the block, one block's cumulative sum picks the
    token; a token of weight 0 is never picked."""
    batch, vocab = weights.shape
    blocks = -(-vocab // _BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(batch, blocks, _BLOCK)
    block_mass = padded.sum(-1)
    cumulative = jnp.cumsum(block_mass, axis=-1)
    target = rng * cumulative[:, -1]
    last_block = blocks - 1 - jnp.argmax((block_mass > 0)[:, ::-1], axis=-1)
    block = jnp.minimum((cumulative <= target[:, None]).sum(-1), last_block)
    inside = jnp.take_along_axis(padded, block[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(cumulative - block_mass, block[:, None], axis=-1)[:, 0]
    within = jnp.cumsum(inside, axis=-1)
    last_token = _BLOCK - 1 - jnp.argmax((inside > 0)[:, ::-1], axis=-1)
    remainder = jnp.maximum(target - before, 0.0)[:, None]  # rounding may take it just below 0
    token = jnp.minimum((within <= remainder).sum(-1), last_token)
    return (block * _BLOCK + token).astype(jnp.int32)
