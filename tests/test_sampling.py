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

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.executors import Sampled, SamplingRow
from jdisagg.sampler import PICKED_ON_HOST, Sampler
from jdisagg.sampling import (
    SampleBranches,
    _comparisons_unrolled,
    _filter_weights,
    _order_keys,
    _select_by_comparisons,
    _select_by_histograms,
    branches_for,
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


# Batches for the cond-free programs: (temperature, top_k, top_p, forced, num_top) per row, on a vocabulary
# of 300 (large enough that top-k 299 is a filter and 300 is none).
BRANCH_VOCAB = 300
BRANCH_BATCHES = {
    "greedy": [(0.0, 0, 1.0, -1, 0)] * 3,
    "greedy, one forced": [(0.0, 0, 1.0, -1, 0), (0.0, 0, 1.0, 5, 0)],
    "sampled but forced": [(0.8, 40, 0.9, 7, 0), (0.0, 0, 1.0, -1, 0)],
    "temperature": [(0.7, 0, 1.0, -1, 0), (0.0, 0, 1.0, -1, 0), (1.0e-5, 0, 1.0, -1, 0)],
    "top-k of the whole vocabulary is no filter": [(0.9, BRANCH_VOCAB, 1.0, -1, 0), (1.2, 0, 1.0, -1, 0)],
    "top-k": [(0.9, 20, 1.0, -1, 0), (1.2, 0, 1.0, -1, 0), (0.0, 0, 1.0, -1, 0)],
    "top-p": [(0.9, 0, 0.8, -1, 0), (1.2, 0, 1.0, -1, 0)],
    "top-k and top-p, greedy rows with filters": [(0.9, 299, 0.5, -1, 0), (0.0, 5, 0.3, -1, 0)],
    "top log-probs": [(0.8, 10, 0.9, -1, 5), (0.0, 0, 1.0, -1, 0)],
}


def _branch_args(rows):
    temperature, top_k, top_p, forced, num_top = (np.array(column) for column in zip(*rows, strict=True))
    host = (temperature.astype(np.float32), top_k.astype(np.int32), top_p.astype(np.float32),
            forced.astype(np.int32), num_top.astype(np.int32))
    logits = np.random.default_rng(len(rows)).normal(size=(len(rows), BRANCH_VOCAB)).astype(np.float32) * 3
    return host, _args(logits, host[0], host[1], host[2], position=np.arange(len(rows)) + 3, forced=host[3],
                       num_top=host[4])


@pytest.mark.parametrize("name", list(BRANCH_BATCHES))
def test_branches_picked_on_the_host_give_the_cond_programs_bits(name):
    """``SampleBranches`` leaves the conds out of the program (on a GPU each one waits for the device); the
    host must pick exactly the branches the conds take, and the outputs must be the same bits."""
    host, args = _branch_args(BRANCH_BATCHES[name])
    branches = branches_for(*host, vocab_size=BRANCH_VOCAB)
    by_cond = _sample(*args)
    by_host = jax.jit(functools.partial(sample_tokens, branches=branches))(*args)
    for field, expected, got in zip(Sampled._fields, by_cond, by_host, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=field)


def test_the_host_reads_the_branches_off_the_rows():
    def picked(name):
        host, _ = _branch_args(BRANCH_BATCHES[name])
        return branches_for(*host, vocab_size=BRANCH_VOCAB)

    greedy = SampleBranches(False, False, False, False)
    assert picked("greedy") == picked("greedy, one forced") == picked("sampled but forced") == greedy
    assert picked("temperature") == SampleBranches(True, False, False, False)  # 1e-5 is GREEDY_BELOW
    assert picked("top-k of the whole vocabulary is no filter") == SampleBranches(True, False, False, False)
    assert picked("top-k") == SampleBranches(True, True, False, False)
    assert picked("top-p") == SampleBranches(True, False, True, False)
    assert picked("top-k and top-p, greedy rows with filters") == SampleBranches(True, True, True, False)
    assert picked("top log-probs") == SampleBranches(True, True, True, True)
    # A filter on a greedy row alone runs no search: greedy batches take argmax only.
    host, _ = _branch_args([(0.0, 5, 0.3, -1, 0)])
    assert branches_for(*host, vocab_size=BRANCH_VOCAB) == greedy


def test_a_sampler_with_host_picked_branches_matches_the_one_program_sampler():
    """The replica's ``Sampler`` compiles the cond-free programs besides the general one when asked (the GPU
    default), routes each batch to the program of its branches, and samples the same tokens."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    samplers = {on_host: Sampler(mesh, BRANCH_VOCAB, (4,), branches_on_host=on_host)
                for on_host in (False, True)}
    for on_host, sampler in samplers.items():
        tasks = sampler.compile_tasks("test")
        assert len(tasks) == (1 + len(PICKED_ON_HOST) if on_host else 1)
        for _, compile_program in tasks:
            compile_program()
    for name, batch in BRANCH_BATCHES.items():
        rows = [SamplingRow(t, k, p, seed, n) for seed, (t, k, p, _, n) in enumerate(batch)]
        forced = [f for *_, f, _ in batch]
        logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, BRANCH_VOCAB)), jnp.float32)
        general, picked = (np.asarray(samplers[on_host](logits, rows, [9] * len(rows), forced).tokens)
                           for on_host in (False, True))
        np.testing.assert_array_equal(picked, general, err_msg=name)


def _control_flow_on_data(module: str) -> list[str]:
    """The ``stablehlo.if``/``case``/``while`` ops of a module that XLA cannot fold away. A
    ``lax.platform_dependent`` lowers to a ``case`` on a constant (which returns the platform's branch
    index, a constant too) and a ``case`` on that: both fold, so a case on a constant counts as one."""
    constants, found = set(), []
    for line in module.splitlines():
        if match := re.match(r"\s*(%[\w#]+) = stablehlo\.constant", line):
            constants.add(match[1])
        elif match := re.match(r'\s*(%[\w#:]+) = "?stablehlo\.(if|case|while)"?\((%[\w#]+)', line):
            result, op, operand = match.groups()
            if op != "while" and operand in constants:
                constants.add(result)
            else:
                found.append(f"{op}({operand})")
    return found


@pytest.mark.parametrize("branches", [None, *PICKED_ON_HOST])
def test_host_picked_programs_lower_for_a_gpu_with_no_cond_or_loop(branches):
    """Lowered for CUDA (from this CPU), the programs a GPU replica runs for greedy, sampled and filtered
    batches branch on no data and loop on nothing (each would be a host round trip on the GPU); the
    general program keeps its conds."""
    _, args = _branch_args(BRANCH_BATCHES["top-k"])
    fn = jax.jit(functools.partial(sample_tokens, branches=branches))
    found = _control_flow_on_data(jax.export.export(fn, platforms=["cuda"])(*args).mlir_module())
    if branches is None:
        assert found
    else:
        assert found == []
