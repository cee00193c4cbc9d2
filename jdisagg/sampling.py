"""Token sampling inside the compiled programs: greedy, temperature, top-k, top-p, per-request seeds.

Sampling runs on device as part of prefill and decode, so only a few numbers per sequence cross to the host
each step. It costs what the batch asks for, and never sorts the vocabulary:

- a batch of greedy rows is one ``argmax`` (the random path is skipped with ``lax.cond``);
- temperature alone is inverse-CDF sampling over the vocabulary in token-id order, two-level (block sums,
  then one block) so no full-length scan runs;
- top-k / top-p only move a per-row *threshold*: the row keeps every token whose scaled logit is at least the
  threshold, then samples like temperature alone. The threshold comes from ``lax.top_k`` over a bounded
  candidate set when the filtered set fits in it (top-k <= candidates, or a nucleus inside the candidates'
  mass) and otherwise from an exact search over the float order (``_select``: interpolation probes, each one
  masked sum over the vocabulary, until few enough elements remain for ``lax.top_k``).
  Both give the same threshold, so a row samples the same token whichever path its batch took.

The random number of a token is ``uniform(fold_in(key(seed), position))``: a request samples the same tokens
whatever else is in its batch, and a preempted sequence recomputed later continues exactly where it was.
Tokens tied at the threshold are all kept (the sort-based definition would keep an arbitrary subset of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdisagg.executors import Sampled
from jdisagg.sampling_params import TOP_LOGPROBS

CANDIDATES = 64  # top-k / top-p candidates taken with lax.top_k before the exact fallback
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows the logits)
_BLOCK = 256  # inverse-CDF block length


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
    in them, else from the exact search (only run when some row needs it)."""
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
        lambda: jnp.where(fits, from_candidates, _search_thresholds(scaled, keys, top_k, top_p, candidates)),
    )


def _key_values(keys: jax.Array) -> jax.Array:
    """The float32 values of order keys (the inverse of ``_order_keys``)."""
    positive = (keys >> 31) == 1
    bits = jnp.where(positive, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _select(
    scaled: jax.Array, keys: jax.Array, weights: jax.Array, target: jax.Array, floor: jax.Array, finish: int
) -> jax.Array:
    """Per row, the largest element key ``t`` with ``sum(weights[keys >= t]) >= target``, searching keys
    ``>= floor`` (``floor`` itself when even the whole range falls short).

    An exact search that needs no sort: it narrows a key interval ``[lo, hi)`` that holds the answer (the
    weight at or above ``lo`` reaches the target, at or above ``hi`` it does not), probing by linear
    interpolation of the weight in value space, every other probe at the key midpoint so that 64 probes halve
    the key range 32 times at worst. Each probe is one pass over the vocabulary. Once at most ``finish``
    elements lie in the interval, ``lax.top_k`` lists them and a cumulative sum from ``hi`` down picks the
    answer (about 20 probes on a flat 32k-token distribution at top-p 0.9, where a bisection needs 32).
    """
    batch = keys.shape[0]
    live = keys >= floor[:, None]
    lo = floor
    hi = keys.max(-1) + 1  # exclusive; keys of finite floats stay below 0xFF800000, so this cannot wrap
    f_lo = jnp.where(live, weights, 0.0).sum(-1)
    f_hi = jnp.zeros(batch, jnp.float32)
    count = live.sum(-1)

    def active(lo, hi, f_lo, count):
        return (count > finish) & (f_lo >= target) & (hi - lo > 1)

    def unfinished(state):
        i, lo, hi, f_lo, _, count = state
        return (i < 64) & jnp.any(active(lo, hi, f_lo, count))

    def probe(state):
        i, lo, hi, f_lo, f_hi, count = state
        v_lo, v_hi = _key_values(lo), _key_values(hi - 1)
        frac = jnp.clip((f_lo - target) / jnp.maximum(f_lo - f_hi, 1e-30), 0.0, 1.0)
        guess = _order_keys(v_lo + frac * (v_hi - v_lo))
        t = jnp.clip(jnp.where(i % 2 == 0, guess, lo + (hi - lo) // 2), lo + 1, hi - 1)
        at_or_above = keys >= t[:, None]
        f_t = jnp.where(at_or_above, weights, 0.0).sum(-1)
        upper = (at_or_above & (keys < hi[:, None])).sum(-1)
        lower = ((keys >= lo[:, None]) & ~at_or_above).sum(-1)
        moving = active(lo, hi, f_lo, count)
        up = moving & (f_t >= target)
        down = moving & ~up
        return (
            i + 1,
            jnp.where(up, t, lo),
            jnp.where(down, t, hi),
            jnp.where(up, f_t, f_lo),
            jnp.where(down, f_t, f_hi),
            jnp.where(up, upper, jnp.where(down, lower, count)),
        )

    _, lo, hi, f_lo, f_hi, _ = jax.lax.while_loop(unfinished, probe, (0, lo, hi, f_lo, f_hi, count))
    inside = (keys >= lo[:, None]) & (keys < hi[:, None])
    values, index = jax.lax.top_k(jnp.where(inside, scaled, -jnp.inf), finish)
    picked = jnp.take_along_axis(jnp.where(inside, weights, 0.0), index, axis=-1)
    reached = (f_hi[:, None] + jnp.cumsum(picked, axis=-1) >= target[:, None]) & (values > -jnp.inf)
    answer = _order_keys(jnp.take_along_axis(values, jnp.argmax(reached, axis=-1)[:, None], axis=-1)[:, 0])
    return jnp.where(reached.any(-1) & (f_lo >= target), answer, lo)


def _search_thresholds(
    scaled: jax.Array, keys: jax.Array, top_k: jax.Array, top_p: jax.Array, finish: int
) -> jax.Array:
    """The exact thresholds without candidates: the k-th largest key, then the nucleus inside that set."""
    zero = jnp.zeros(keys.shape[:1], jnp.uint32)
    k_key = jax.lax.cond(
        jnp.any(top_k > 0),
        lambda: jnp.where(
            top_k > 0,
            _select(scaled, keys, jnp.ones_like(scaled), top_k.astype(jnp.float32), zero, finish),
            0,
        ),
        lambda: zero,
    )
    in_top_k = keys >= k_key[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
    p_key = jax.lax.cond(
        jnp.any(top_p < 1.0),
        lambda: jnp.where(top_p < 1.0, _select(scaled, keys, probs, top_p, k_key, finish), 0),
        lambda: zero,
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
