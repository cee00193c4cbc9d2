"""Token sampling inside the compiled programs: greedy, temperature, top-k, top-p, per-request seeds.

Sampling runs on device as part of prefill and decode, so only a few numbers per sequence cross to the host
each step. It costs what the batch asks for, never sorts the vocabulary and runs no data-dependent loop (on a
GPU every iteration of one would wait for the host to read its predicate):

- a batch of greedy rows is one ``argmax`` (the random path is skipped with ``lax.cond``, or, where the
  host picked the branches beforehand (``SampleBranches``), left out of the program);
- temperature alone is inverse-CDF sampling over the vocabulary in token-id order, two-level (block sums,
  then one block) so no full-length scan runs;
- top-k / top-p only move a per-row *threshold*: the row keeps every token whose logit is at least the
  threshold, then samples like temperature alone. The threshold is an exact radix select over the logits'
  32-bit order keys (``_select``), digit by digit from the top: each digit is the largest whose tokens at or
  above it still hold the wanted count (top-k) or probability mass (top-p). Its cost is a fixed number of
  passes over the vocabulary, the same for a flat distribution as for a peaked one. (On CPU a top-k of at
  most 64 is read off ``lax.top_k`` instead, which is cheaper there and gives the same key.)

How a digit's sums are taken is the platform's choice (``lax.platform_dependent``), by measurement at vocab
128,256 and batch 16 (docs/benchmarks.md): on CPU a scatter-add histogram of 65,536 bins gives two 8-bit
digits per pass (two passes; below a vocabulary of 2,048 comparisons are cheaper there too); elsewhere one
fused compare-and-reduce pass gives the 16 suffix sums of a 4-bit digit (eight passes: a loop on CPU,
compiled once rather than eight times; unrolled elsewhere). On a GPU a float scatter-add was no faster and
uses atomics, whose order, and so a threshold at a knife-edge of the sums, would vary from run to run; 8-bit
digits by comparison were 3.5x slower (a pass re-reads the row once per candidate), 2-bit ones no faster.

Temperature does not change the order of the logits, so thresholds are keys of the logits themselves. Tokens
tied at the threshold are all kept (the sort-based definition would keep an arbitrary subset of them).
The random number of a token is ``uniform(fold_in(key(seed), position))``: a request samples the same tokens
whatever else is in its batch, and a preempted sequence recomputed later continues exactly where it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.executors import Sampled
from jdisagg.sampling_params import TOP_LOGPROBS

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows the logits)


class SampleBranches(NamedTuple):
    """Which of ``sample_tokens``' optional parts a batch needs, read off its rows on the host
    (``branches_for``). Given to ``sample_tokens``, the program holds those parts and no ``lax.cond``: on
    a GPU a cond copies its predicate to the host and waits for it (XLA's conditional thunk blocks the
    thread that launches the program until the device has caught up), so the host's dispatch of a sample
    program would wait for the decode step queued before it, and the decode loop would lose its overlap.
    The outputs are the same bits as the cond program's: each part left in computes what its cond's true
    branch would, and rows that do not ask for a part pass through it unchanged."""

    sample: bool  # some row samples: temperature at least GREEDY_BELOW and not forced
    top_k: bool  # the batch samples and some row has a top-k below the vocabulary
    top_p: bool  # the batch samples and some row has a top-p below 1
    top_logprobs: bool  # some row asked for its most likely alternatives


def branches_for(
    temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, forced: np.ndarray, num_top: np.ndarray,
    vocab_size: int,
) -> SampleBranches:
    """The branches ``sample_tokens``' conds would take for these per-row inputs (the float32 / int32 host
    arrays uploaded for them, so the comparisons round as the device's do)."""
    sample = bool(np.any((temperature >= np.float32(GREEDY_BELOW)) & (forced < 0)))
    return SampleBranches(
        sample,
        sample and bool(np.any((top_k > 0) & (top_k < vocab_size))),
        sample and bool(np.any(top_p < np.float32(1.0))),
        bool(np.any(num_top > 0)),
    )


def _branch(taken: bool | None, predicate: jax.Array, if_true, if_false):
    """``lax.cond`` on the device's ``predicate``, or, when the host knows the branch (``taken``), only
    that branch in the program."""
    if taken is None:
        return jax.lax.cond(predicate, if_true, if_false)
    return if_true() if taken else if_false()


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
    branches: SampleBranches | None = None,
) -> Sampled:
    """One token per row, its log-probability under the model, and (when asked) the top alternatives.

    Log-probabilities are of the unscaled model distribution (temperature and filters are how we pick, not
    what the model says), so forced tokens give exactly the model's likelihood of a given continuation.
    ``branches`` (static): the optional parts this batch needs, picked on the host; None: ``lax.cond``
    picks them on device, so one program serves every batch.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature >= GREEDY_BELOW
    sampled = _branch(
        None if branches is None else branches.sample,
        jnp.any(sampling & (forced < 0)),
        lambda: _sample(logits, temperature, top_k, top_p, seeds, positions,
                        None if branches is None else (branches.top_k, branches.top_p)),
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
    top_ids, top_lps = _branch(
        None if branches is None else branches.top_logprobs,
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
    filters: tuple[bool, bool] | None,
) -> jax.Array:
    scaled = logits / jnp.maximum(temperature, GREEDY_BELOW)[:, None]
    weights = jnp.exp(scaled - scaled.max(-1, keepdims=True))
    top_k = jnp.where(top_k >= logits.shape[-1], 0, top_k)  # keeping the whole vocabulary is no filter
    weights = _branch(
        None if filters is None else any(filters),
        jnp.any((top_k > 0) | (top_p < 1.0)),
        lambda: _filter_weights(logits, weights, top_k, top_p, filters),
        lambda: weights,
    )
    uniform = jax.vmap(lambda s, p: jax.random.uniform(jax.random.fold_in(jax.random.key(s), p)))
    return _inverse_cdf(weights, uniform(seeds, positions))


def _filter_weights(
    logits: jax.Array, weights: jax.Array, top_k: jax.Array, top_p: jax.Array,
    on_host: tuple[bool, bool] | None = None,
) -> jax.Array:
    """``weights`` (the unnormalised probabilities of ``logits``' rows) with every token outside the row's
    filters zeroed: the top-k set first (``top_k`` 0: off), then the smallest head of what is left that holds
    ``top_p`` of its mass (1: off). Each search runs only when some row of the batch asks for it, decided on
    device, or on the host (``on_host``: whether to run the top-k and the top-p search)."""
    keys = _order_keys(logits)
    keep_all = jnp.zeros(keys.shape[:1], jnp.uint32)  # the smallest key
    k_key = _branch(
        None if on_host is None else on_host[0],
        jnp.any(top_k > 0),
        lambda: jnp.where(top_k > 0, _kth_largest_keys(logits, keys, top_k), 0),
        lambda: keep_all,
    )
    weights = jnp.where(keys >= k_key[:, None], weights, 0.0)
    p_key = _branch(
        None if on_host is None else on_host[1],
        jnp.any(top_p < 1.0),
        lambda: jnp.where(top_p < 1.0, _select(keys, weights, top_p * weights.sum(-1)), 0),
        lambda: keep_all,
    )
    return jnp.where(keys >= p_key[:, None], weights, 0.0)


_CPU_TOP_K = 64  # on CPU, lax.top_k over this many is cheaper than a search (on a GPU it is not)


def _kth_largest_keys(logits: jax.Array, keys: jax.Array, top_k: jax.Array) -> jax.Array:
    """Per row, the key of the ``top_k``-th largest logit: the count search, or on CPU, when every row's
    ``top_k`` is at most 64, read off ``lax.top_k``. Both are exact (no float sums), so a row's key does not
    depend on which one its batch took."""

    def by_count() -> jax.Array:
        return _select(keys, jnp.ones(keys.shape, jnp.float32), top_k.astype(jnp.float32))

    def on_cpu() -> jax.Array:
        candidates = min(_CPU_TOP_K, logits.shape[-1])
        values = jax.lax.top_k(logits, candidates)[0]
        kth = jnp.take_along_axis(values, jnp.clip(top_k - 1, 0, candidates - 1)[:, None], axis=-1)[:, 0]
        return jax.lax.cond(jnp.all(top_k <= candidates), lambda: _order_keys(kth), by_count)

    return jax.lax.platform_dependent(cpu=on_cpu, default=by_count)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values (the radix-sort trick), so thresholds compare exactly
    and are selected digit by digit. -0.0 takes +0.0's key: the two are tied, and ties stay together."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


_HISTOGRAM_FROM_VOCAB = 2048  # below it a row's 65,536 histogram bins cost more than comparing its tokens


def _select(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest key ``t`` with ``sum(weights[keys >= t]) >= target``, or 0 (every key) when even
    the whole row falls short: for unit weights and target k the k-th largest key, for probabilities and
    target p x total the smallest key of the nucleus. Exact, and the same key on every platform but for the
    float rounding of the sums."""
    if keys.shape[-1] < _HISTOGRAM_FROM_VOCAB:
        return _select_by_comparisons(keys, weights, target)
    return jax.lax.platform_dependent(
        keys, weights, target, cpu=_select_by_histograms, default=_select_by_comparisons
    )


def _select_by_comparisons(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """``_select`` in eight passes of one fused reduction each (deterministic, no scatter): a pass compares
    every key with the 16 candidates for the next 4-bit digit and sums the weights at or above each.

    On CPU the passes are a ``fori_loop``: one compiled body instead of eight roughly halves the sample
    program's compile time, and the loop costs nothing there. Elsewhere they stay unrolled, as a loop's
    predicate would go through the host on every pass. Both compute the same sums, so the same key."""
    return jax.lax.platform_dependent(
        keys, weights, target, cpu=_comparisons_in_a_loop, default=_comparisons_unrolled
    )


_COMPARISON_PASSES = 8  # 4-bit digits of a 32-bit key


def _comparisons_unrolled(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    key = jnp.zeros(keys.shape[:1], jnp.uint32)
    for index in range(_COMPARISON_PASSES):
        key = _next_digit(keys, weights, target, index, key)
    return key


def _comparisons_in_a_loop(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    return jax.lax.fori_loop(
        0,
        _COMPARISON_PASSES,
        lambda index, key: _next_digit(keys, weights, target, index, key),
        jnp.zeros(keys.shape[:1], jnp.uint32),
    )


def _next_digit(
    keys: jax.Array, weights: jax.Array, target: jax.Array, index: jax.Array | int, key: jax.Array
) -> jax.Array:
    """``key`` with pass ``index``'s 4-bit digit set (pass 0: the top digit)."""
    shift = jnp.uint32(28) - jnp.uint32(4) * jnp.asarray(index, jnp.uint32)
    candidates = key[:, None] | (jnp.arange(16, dtype=jnp.uint32) << shift)  # [B, 16]
    at_or_above = jnp.where(keys[:, None, :] >= candidates[:, :, None], weights[:, None, :], 0.0).sum(-1)
    return key | (_largest_reaching(at_or_above, target) << shift)


def _select_by_histograms(keys: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """``_select`` in two passes: a pass scatter-adds the weights of the keys that share the digits found so
    far into a histogram of their next 16 bits, which gives two 8-bit digits (256 coarse bins, then the 256
    fine bins of the chosen one)."""
    batch = keys.shape[0]
    key = jnp.zeros(batch, jnp.uint32)
    above = jnp.zeros(batch, jnp.float32)  # weight of the keys above the range the digits found so far allow
    row_offsets = jnp.arange(batch)[:, None] * 65536
    for shift in (16, 0):
        inside = weights if shift == 16 else jnp.where((keys >> 16) == (key >> 16)[:, None], weights, 0.0)
        bins = ((keys >> shift) & 0xFFFF).astype(jnp.int32) + row_offsets
        # Flat, with scalar updates: XLA's CPU scatter is several times slower into a [B, bins] operand, and
        # the [N, 1] updates of jnp's .at[].add leave what computes them (an exp) unvectorised.
        histogram = jax.lax.scatter_add(
            jnp.zeros(batch * 65536, jnp.float32),
            bins.reshape(-1, 1),
            inside.ravel(),
            jax.lax.ScatterDimensionNumbers((), (0,), (0,)),
            mode="promise_in_bounds",
        )
        histogram = histogram.reshape(batch, 256, 256)
        high, above = _pick_bin(histogram.sum(-1), above, target)
        fine = jnp.take_along_axis(histogram, high[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        low, above = _pick_bin(fine, above, target)
        key = key | (high << (shift + 8)) | (low << shift)
    return key


def _pick_bin(bins: jax.Array, above: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The digit of ``_largest_reaching`` given one digit's bins and the weight ``above`` them, and the
    weight above the chosen bin (the next digit's ``above``)."""
    at_or_above = above[:, None] + jnp.cumsum(bins[:, ::-1], axis=-1)[:, ::-1]
    digit = _largest_reaching(at_or_above, target)
    beyond = jnp.concatenate([at_or_above[:, 1:], above[:, None]], axis=-1)
    return digit, jnp.take_along_axis(beyond, digit[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _largest_reaching(at_or_above: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest digit whose weight at or above it reaches ``target``, 0 when none does (the sums
    of a finer digit may round just below what the coarser one promised: then its whole bin is kept)."""
    digits = jnp.arange(at_or_above.shape[-1], dtype=jnp.uint32)
    return jnp.max(jnp.where(at_or_above >= target[:, None], digits, 0), axis=-1)


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
