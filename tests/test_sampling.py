"""The sampler draws from exactly the filtered distribution, whichever way its threshold is searched.

Each frequency case draws 40,000 tokens (one per seed) from fixed logits on a 12-token vocabulary and compares
the frequencies with the exact filtered probabilities, computed here in numpy from the sort-based definition
(top-k, then the smallest prefix of the renormalised top-k set whose mass reaches top-p). The seeds are
fixed, so each case passes or fails the same way every run.

The threshold has two implementations (``_select_by_comparisons``: accelerators and small vocabularies, so
the frequency cases run it; ``_select_by_histograms``: CPU at large vocabularies), and the comparisons run
as a loop on CPU but unrolled elsewhere (``_comparisons_unrolled``, checked here too). Everything after the
threshold is shared, so the large-vocabulary cases check that all find the sort-based filtered set.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.sampling import (
    _comparisons_unrolled,
    _filter_weights,
    _order_keys,
    _select_by_comparisons,
    _select_by_histograms,
    sample_tokens,
)

VOCAB = 12
DRAWS = 40_000
# Chi-square critical values at p = 1e-4 for 1..11 degrees of freedom.
CHI2_CRITICAL = [15.1, 18.4, 21.1, 23.5, 25.7, 27.9, 29.9, 31.8, 33.7, 35.6, 37.4]
LOGITS = np.array(np.random.default_rng(0).normal(size=VOCAB) * 1.5, np.float32)
SELECTS = [_select_by_comparisons, _comparisons_unrolled, _select_by_histograms]

_sample = jax.jit(sample_tokens)
_selects = {select: jax.jit(select) for select in SELECTS}


def _args(logits, temperature, top_k, top_p, *, seeds=None, position=7, forced=-1, num_top=0):
    """``sample_tokens``' arguments for rows of ``logits``; scalars apply to every row."""
    n = len(logits)
    row = lambda value, dtype: jnp.broadcast_to(jnp.asarray(value, dtype), (n,))  # noqa: E731
    return (
        jnp.asarray(logits, jnp.float32),
        row(temperature, jnp.float32),
        row(top_k, jnp.int32),
        row(top_p, jnp.float32),
        jnp.arange(n, dtype=jnp.uint32) if seeds is None else row(seeds, jnp.uint32),
        row(position, jnp.int32),
        row(forced, jnp.int32),
        row(num_top, jnp.int32),
    )


def _draw(temperature, top_k, top_p, *, forced=-1, num_top=0, n=DRAWS):
    rows = np.broadcast_to(LOGITS, (n, VOCAB))
    return _sample(*_args(rows, temperature, top_k, top_p, forced=forced, num_top=num_top))


def _sort_based_kept(logits, top_k, top_p):
    """The filtered set by its definition: sort, cut to top_k, keep the prefix whose mass before each token
    is still below top_p (in float64)."""
    scaled = np.asarray(logits, np.float64)
    order = np.argsort(-scaled, kind="stable")[: top_k or scaled.size]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    kept = np.zeros(scaled.size, bool)
    kept[order[np.cumsum(probs) - probs < top_p]] = True
    return kept


def _filtered_probs(temperature, top_k, top_p):
    scaled = LOGITS.astype(np.float64) / temperature
    weights = np.where(_sort_based_kept(scaled, top_k, top_p), np.exp(scaled - scaled.max()), 0.0)
    return weights / weights.sum()


CASES = [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.6), (0.5, 0, 0.95), (2.0, 8, 0.9)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
    tokens = np.asarray(_draw(temperature, top_k, top_p).tokens)
    expected = _filtered_probs(temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=VOCAB)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    chi2 = ((counts[kept] - DRAWS * expected[kept]) ** 2 / (DRAWS * expected[kept])).sum()
    degrees = int(kept.sum()) - 1
    if degrees:
        assert chi2 < CHI2_CRITICAL[degrees - 1], (chi2, counts, expected * DRAWS)


def test_a_row_samples_the_same_token_whatever_its_batch():
    """Rows of every kind in one batch (greedy, temperature, top-k inside and beyond 64, top-p tiny to
    nearly 1, both filters, forced): each row gets the token and log-prob it gets in a batch of its own
    kind, and rows that must not sample (greedy, top-k 1, a tiny top-p) give the argmax."""
    n, vocab = 96, 3000  # a vocabulary past _HISTOGRAM_FROM_VOCAB: the CPU's histogram search
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(n, vocab)).astype(np.float32) * rng.choice([0.05, 1.0, 4.0], size=(n, 1))
    kinds = [
        (0.0, 0, 1.0),
        (0.9, 0, 1.0),
        (0.9, 1, 1.0),
        (0.9, 50, 1.0),
        (1.2, 900, 1.0),
        (0.9, 0, 0.9),
        (0.7, 0, 1e-7),
        (1.0, 0, 0.999),
        (0.8, 40, 0.9),
        (1.1, 700, 0.5),
        (0.8, 0, 0.6),
        (0.8, 5, 1.0),
    ]
    temperature, top_k, top_p = (np.array([kinds[i % len(kinds)][j] for i in range(n)]) for j in range(3))
    forced = np.where(np.arange(n) % 17 == 5, 3, -1)
    seeds, positions = np.arange(n) * 7 + 1, np.arange(n) % 13

    def run(rows):
        return _sample(
            jnp.asarray(logits[rows]), jnp.asarray(temperature[rows], jnp.float32),
            jnp.asarray(top_k[rows], jnp.int32), jnp.asarray(top_p[rows], jnp.float32),
            jnp.asarray(seeds[rows], jnp.uint32), jnp.asarray(positions[rows], jnp.int32),
            jnp.asarray(forced[rows], jnp.int32), jnp.zeros(len(rows), jnp.int32),
        )  # fmt: skip

    together = run(np.arange(n))
    tokens = np.asarray(together.tokens)
    for kind in range(len(kinds)):
        rows = np.arange(kind, n, len(kinds))
        alone = run(rows)
        np.testing.assert_array_equal(tokens[rows], np.asarray(alone.tokens))
        np.testing.assert_array_equal(np.asarray(together.logprobs)[rows], np.asarray(alone.logprobs))
    argmax = logits.argmax(-1)
    must_be_argmax = (temperature == 0) | (top_k == 1) | (top_p < 1e-6)
    assert (tokens[forced >= 0] == 3).all()
    free = forced < 0
    np.testing.assert_array_equal(tokens[must_be_argmax & free], argmax[must_be_argmax & free])
    for row in np.flatnonzero((top_k > 0) & (forced < 0)):  # never a token outside the top-k
        assert (logits[row] > logits[row, tokens[row]]).sum() < top_k[row]


def test_greedy_forced_logprobs_and_top_alternatives():
    out = _draw(0.0, 0, 1.0, num_top=5)
    log_probs = LOGITS - np.log(np.exp(LOGITS.astype(np.float64)).sum())
    assert (np.asarray(out.tokens) == LOGITS.argmax()).all()
    np.testing.assert_allclose(np.asarray(out.logprobs), log_probs.max(), rtol=1e-5)
    ranked = np.argsort(-LOGITS)
    np.testing.assert_array_equal(np.asarray(out.top_ids)[0, :5], ranked[:5])
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0, :5], log_probs[ranked[:5]], rtol=1e-5)
    assert np.asarray(out.top_ids).shape == (DRAWS, 20)  # padded past a vocabulary smaller than the bound

    forced = _draw(0.8, 3, 0.5, forced=4)
    assert (np.asarray(forced.tokens) == 4).all()
    np.testing.assert_allclose(np.asarray(forced.logprobs), log_probs[4], rtol=1e-5)


def test_no_alternatives_are_computed_when_no_row_asks():
    out = _draw(0.0, 0, 1.0)
    assert not np.asarray(out.top_ids).any() and not np.asarray(out.top_logprobs).any()


def _kept(logits, top_k, top_p):
    """The tokens ``_filter_weights`` keeps per row (the CPU's search for this vocabulary size)."""
    logits = jnp.asarray(logits, jnp.float32)
    rows = logits.shape[0]
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    top_k, top_p = jnp.full(rows, top_k, jnp.int32), jnp.full(rows, top_p, jnp.float32)
    return np.asarray(jax.jit(_filter_weights)(logits, weights, top_k, top_p) > 0)


LARGE = np.stack([np.random.default_rng(5).normal(size=5000) * s for s in (0.01, 0.1, 1.0, 4.0)])


@pytest.mark.parametrize(
    ("top_k", "top_p"),
    [(0, 0.5), (0, 0.9), (0, 0.99), (0, 0.999), (100, 1.0), (1000, 0.9), (3000, 0.3), (4999, 1.0), (1, 1.0)],
)
def test_the_search_finds_the_sort_based_filtered_set_on_a_large_vocabulary(top_k, top_p):
    """Flat to peaked rows, top-k far past any candidate list, top-p up to 0.999: exactly the sort-based
    set, and every search finds the same thresholds."""
    kept = _kept(LARGE, top_k, top_p)
    for row, logits in enumerate(LARGE):
        np.testing.assert_array_equal(kept[row], _sort_based_kept(logits.astype(np.float32), top_k, top_p))
    keys = _order_keys(jnp.asarray(LARGE, jnp.float32))
    weights = jnp.exp(jnp.asarray(LARGE, jnp.float32) - LARGE.max(-1, keepdims=True).astype(np.float32))
    searches = [(jnp.ones_like(weights), jnp.full(4, float(top_k)))] if top_k else []
    searches += [(weights, top_p * weights.sum(-1))] if top_p < 1 else []
    for row_weights, target in searches:
        thresholds = [np.asarray(_selects[s](keys, row_weights, target)) for s in SELECTS]
        for other in thresholds[1:]:
            np.testing.assert_array_equal(other, thresholds[0])


@pytest.mark.parametrize("select", SELECTS, ids=lambda s: s.__name__)
def test_ties_at_the_threshold_are_all_kept(select):
    """A top-k or a nucleus ending inside a group of equal logits keeps the whole group (-0.0 and +0.0 are
    equal too); a row of one value keeps everything."""
    vocab = 4096
    logits = np.full((3, vocab), -5.0, np.float32)
    logits[0, :6] = [3.0, 2.0, 2.0, 2.0, 1.0, 2.0]  # top-2 ends inside the four 2.0s
    logits[1, :4] = [1.0, 0.0, -0.0, 0.0]  # top-2 ends inside the zeros, whatever their sign
    logits[2] = 0.5  # all tied
    keys = _order_keys(jnp.asarray(logits))
    kept = np.asarray(keys >= jax.jit(select)(keys, jnp.ones(logits.shape), jnp.full(3, 2.0))[:, None])
    assert kept[0].sum() == 5 and kept[0, [0, 1, 2, 3, 5]].all()
    assert kept[1].sum() == 4 and kept[1, :4].all()
    assert kept[2].all()
    weights = jnp.exp(jnp.asarray(logits) - logits.max(-1, keepdims=True))
    # Mass just past the top token: the nucleus needs one of the tied 2.0s, so it takes them all.
    target = (weights[:, 0] + 0.5 * weights[:, 1]).at[2].set(0.3 * vocab)
    kept = np.asarray(keys >= jax.jit(select)(keys, weights, target)[:, None])
    assert kept[0].sum() == 5 and kept[2].all()


@pytest.mark.parametrize("select", SELECTS, ids=lambda s: s.__name__)
def test_the_search_edges(select):
    """Out-of-range targets keep the whole row (key 0); a target of one token's weight keeps the top token;
    -inf logits never reach the nucleus; top-k beyond the finite logits keeps them all."""
    vocab = 4096
    logits = np.random.default_rng(3).normal(size=(2, vocab)).astype(np.float32)
    logits[1, 100:] = -np.inf
    keys = _order_keys(jnp.asarray(logits))
    weights = jnp.exp(jnp.asarray(logits) - logits.max(-1, keepdims=True))
    run = jax.jit(select)
    np.testing.assert_array_equal(np.asarray(run(keys, weights, weights.sum(-1) * 2)), [0, 0])
    top = np.asarray(keys >= run(keys, weights, jnp.full(2, 1e-30))[:, None])
    np.testing.assert_array_equal(top.sum(-1), [1, 1])
    assert top[np.arange(2), logits.argmax(-1)].all()
    nucleus = np.asarray(keys >= run(keys, weights, 0.999 * weights.sum(-1))[:, None])
    assert not nucleus[1, 100:].any() and nucleus[1, :100].sum() > 50
    top_150 = np.asarray(keys >= run(keys, jnp.ones(logits.shape), jnp.full(2, 150.0))[:, None])
    assert top_150[0].sum() == 150 and top_150[1].sum() == vocab  # -inf ties: all kept


def test_top_p_at_the_float_limit_drops_only_negligible_mass():
    """top_p = 1 - 2**-24, the largest float32 below 1: what is dropped is below float32 resolution of the
    row's mass, so it differs from the float64 definition only in tokens of negligible probability."""
    top_p = float(np.nextafter(np.float32(1), np.float32(0)))
    kept = _kept(LARGE, 0, top_p)
    for row, logits in enumerate(LARGE):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        differ = kept[row] != _sort_based_kept(logits.astype(np.float32), 0, top_p)
        assert probs[differ].sum() < 1e-6 and probs[~kept[row]].sum() < 1e-6
