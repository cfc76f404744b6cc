"""The token filters on hand-made distributions, and what sampling draws from them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openr1_jax.generate.sampling import SamplingParams, filter_mask, row_sampling, sample

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 on tokens 2, 0, 4, 1, 3 (out of vocabulary order on purpose).
PROBS = np.array([0.3, 0.1, 0.4, 0.05, 0.15])
LOGITS = jnp.log(jnp.asarray([PROBS]))


def kept(**kw) -> set[int]:
    params = SamplingParams(**kw)
    mask = filter_mask(LOGITS, row_sampling([params], [0], [0], vocab=5))
    return set(np.flatnonzero(np.asarray(mask[0])).tolist())


def test_no_filter_keeps_everything():
    assert kept() == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(("k", "want"), [(1, {2}), (2, {2, 0}), (3, {2, 0, 4}), (5, {0, 1, 2, 3, 4})])
def test_top_k(k, want):
    assert kept(top_k=k) == want


@pytest.mark.parametrize(
    ("p", "want"),
    # The smallest prefix (by probability) whose mass reaches p: 0.4 | 0.7 | 0.85 | 0.95 | 1.0
    [
        (0.3, {2}),
        (0.4, {2}),
        (0.41, {2, 0}),
        (0.7, {2, 0}),
        (0.8, {2, 0, 4}),
        (0.9, {2, 0, 4, 1}),
        (0.99, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p(p, want):
    assert kept(top_p=p) == want


def test_top_p_applies_to_the_top_k_renormalised():
    # top-2 renormalised: 0.4/0.7 = 0.571, 0.3/0.7 = 0.429; top-p 0.5 keeps only the first.
    assert kept(top_k=2, top_p=0.5) == {2}
    assert kept(top_k=2, top_p=0.6) == {2, 0}


@pytest.mark.parametrize(("m", "want"), [(0.0, {0, 1, 2, 3, 4}), (0.25, {2, 0, 4, 1}), (0.5, {2, 0}), (1.0, {2})])
def test_min_p_is_relative_to_the_top_probability(m, want):
    assert kept(min_p=m) == want  # keeps p >= m * 0.4


def test_temperature_reshapes_before_filtering():
    # T -> 0 concentrates the mass on the best token: top-p 0.9 then keeps it alone.
    assert kept(temperature=0.05, top_p=0.9) == {2}
    # A high temperature flattens: 0.9 of the mass needs every token.
    assert kept(temperature=100.0, top_p=0.9) == {0, 1, 2, 3, 4}


def test_samples_follow_the_filtered_distribution():
    n = 4000
    params = [SamplingParams(top_k=2)] * n
    rows = row_sampling(params, list(range(n)), [0] * n, vocab=5)
    tokens, logprobs = sample(jnp.repeat(LOGITS, n, axis=0), rows, jnp.zeros((n,), jnp.int32))
    counts = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(counts, [0.3 / 0.7, 0, 0.4 / 0.7, 0, 0], atol=0.03)
    # logprobs are those of the unfiltered temperature-1 distribution
    np.testing.assert_allclose(np.asarray(logprobs), np.log(PROBS)[np.asarray(tokens)], rtol=1e-5)
    # Without logprobs (no request of the call asked): the same draws, no log_softmax.
    same, zeros = sample(jnp.repeat(LOGITS, n, axis=0), rows, jnp.zeros((n,), jnp.int32), logprobs=False)
    np.testing.assert_array_equal(same, tokens)
    assert not np.asarray(zeros).any()


def test_greedy_and_seeds():
    rows = row_sampling([SamplingParams(temperature=0)] * 3, [1, 2, 3], [0, 0, 0], vocab=5)
    tokens, _ = sample(jnp.repeat(LOGITS, 3, axis=0), rows, jnp.zeros((3,), jnp.int32))
    assert tokens.tolist() == [2, 2, 2]

    jitted = jax.jit(sample)

    def draw(seed, index, step):
        rows = row_sampling([SamplingParams()], [seed], [index], vocab=5)
        return [int(jitted(LOGITS, rows, jnp.full((1,), s, jnp.int32))[0][0]) for s in range(step)]

    assert draw(5, 0, 30) == draw(5, 0, 30)
    assert draw(5, 0, 30) != draw(6, 0, 30)
    assert draw(5, 0, 30) != draw(5, 1, 30)


def test_sampling_params_validate():
    for bad in (
        dict(temperature=-1),
        dict(top_k=0),
        dict(min_p=2),
        dict(n=0),
        dict(max_new_tokens=0),
        dict(stop=("",)),
    ):
        with pytest.raises(Exception, match="sampling parameter"):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)
