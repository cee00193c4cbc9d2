"""The sampler draws from exactly the filtered distribution, whichever path computes its threshold.

Each case draws 40,000 tokens (one per seed) from fixed logits on a 12-token vocabulary and compares the
frequencies with the exact filtered probabilities, computed here in numpy from the sort-based definition
(top-k, then the smallest prefix of the renormalised top-k set whose mass reaches top-p). The seeds are
fixed, so each case passes or fails the same way every run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.sampling import _order_keys, _thresholds, sample_tokens

VOCAB = 12
DRAWS = 40_000
# Chi-square critical values at p = 1e-4 for 1..11 degrees of freedom.
CHI2_CRITICAL = [15.1, 18.4, 21.1, 23.5, 25.7, 27.9, 29.9, 31.8, 33.7, 35.6, 37.4]
LOGITS = np.array(np.random.default_rng(0).normal(size=VOCAB) * 1.5, np.float32)


_sample = jax.jit(sample_tokens, static_argnames="candidates")  # one compile per candidates value


def _draw(temperature, top_k, top_p, *, candidates=64, forced=-1, num_top=0, n=DRAWS):
    rows = jnp.broadcast_to(jnp.asarray(LOGITS), (n, VOCAB))
    return _sample(
        rows,
        jnp.full(n, temperature, jnp.float32),
        jnp.full(n, top_k, jnp.int32),
        jnp.full(n, top_p, jnp.float32),
        jnp.arange(n, dtype=jnp.uint32),
        jnp.full(n, 7, jnp.int32),
        jnp.full(n, forced, jnp.int32),
        jnp.full(n, num_top, jnp.int32),
        candidates=candidates,
    )


def _filtered_probs(temperature, top_k, top_p):
    scaled = LOGITS.astype(np.float64) / temperature
    order = np.argsort(-scaled)[: top_k or VOCAB]
    probs = np.exp(scaled[order] - scaled[order].max())
    probs /= probs.sum()
    kept = order[np.cumsum(probs) - probs < top_p]
    weights = np.zeros(VOCAB)
    weights[kept] = np.exp(scaled[kept] - scaled.max())
    return weights / weights.sum()


CASES = [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.6), (0.5, 0, 0.95), (2.0, 8, 0.9)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
@pytest.mark.parametrize("candidates", [64, 2], ids=["candidates", "bisection"])
def test_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, candidates):
    tokens = np.asarray(_draw(temperature, top_k, top_p, candidates=candidates).tokens)
    expected = _filtered_probs(temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=VOCAB)
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    chi2 = ((counts[kept] - DRAWS * expected[kept]) ** 2 / (DRAWS * expected[kept])).sum()
    degrees = int(kept.sum()) - 1
    if degrees:
        assert chi2 < CHI2_CRITICAL[degrees - 1], (chi2, counts, expected * DRAWS)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), CASES)
def test_threshold_path_does_not_change_the_token(temperature, top_k, top_p):
    """Candidates and bisection find the same threshold, so a seed gives the same token on either path (a
    row's token must not depend on whether another row in its batch forced the fallback)."""
    fast = _draw(temperature, top_k, top_p, candidates=64).tokens
    exact = _draw(temperature, top_k, top_p, candidates=2).tokens
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(exact))


def test_a_row_samples_the_same_token_whatever_its_batch():
    n = 256
    logits = np.random.default_rng(1).normal(size=(n, 1000)).astype(np.float32) * 3
    temperature = np.full(n, 0.9, np.float32)
    top_p = np.where(np.arange(n) % 2 == 0, 0.9, 1.0).astype(np.float32)  # some rows force the bisection
    args = lambda sl: (  # noqa: E731
        jnp.asarray(logits[sl]),
        jnp.asarray(temperature[sl]),
        jnp.zeros(len(logits[sl]), jnp.int32),
        jnp.asarray(top_p[sl]),
        jnp.arange(n, dtype=jnp.uint32)[sl],
        jnp.full(len(logits[sl]), 3, jnp.int32),
        jnp.full(len(logits[sl]), -1, jnp.int32),
        jnp.zeros(len(logits[sl]), jnp.int32),
    )
    together = np.asarray(_sample(*args(slice(None))).tokens)
    odd_rows_alone = np.asarray(_sample(*args(slice(1, None, 2))).tokens)
    np.testing.assert_array_equal(together[1::2], odd_rows_alone)


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


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(0, 0.5), (0, 0.9), (0, 0.99), (100, 1.0), (1000, 0.9), (3000, 0.3)]
)
def test_the_search_finds_the_sort_based_threshold_on_a_large_vocabulary(top_k, top_p):
    """Past the candidates, the search keeps exactly the sort-based filtered set (flat and peaked rows)."""
    rng = np.random.default_rng(5)
    logits = np.stack([rng.normal(size=5000) * scale for scale in (0.1, 1.0, 4.0)]).astype(np.float32)
    rows = len(logits)
    keys = _order_keys(jnp.asarray(logits))
    threshold = _thresholds(
        jnp.asarray(logits), keys, jnp.full(rows, top_k, jnp.int32), jnp.full(rows, top_p, jnp.float32), 16
    )
    kept = np.asarray(keys >= threshold[:, None])
    for row, scaled in enumerate(logits.astype(np.float64)):
        order = np.argsort(-scaled)[: top_k or scaled.size]
        probs = np.exp(scaled[order] - scaled[order].max())
        probs /= probs.sum()
        expected = np.zeros(scaled.size, bool)
        expected[order[np.cumsum(probs) - probs < top_p]] = True
        # At most one token may differ, at a float knife-edge of the cumulative sums.
        assert (kept[row] != expected).sum() <= 1, (row, kept[row].sum(), expected.sum())
