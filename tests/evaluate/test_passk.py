"""pass@k: the unbiased estimator against brute-force enumeration and hand values."""

import itertools
import math

import pytest

from openr1_jax.errors import UserError
from openr1_jax.evaluate.passk import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


def test_hand_values():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong samples: every 5 of them hold a correct one
    assert pass_at_k(3, 3, 3) == 1.0


def test_pass_at_1_is_the_mean_correctness():
    for n, c in [(64, 13), (16, 0), (7, 7)]:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_large_n_is_finite_and_matches_exact_binomials():
    n, c, k = 1024, 10, 512
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact big-integer binomials, then one division
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_mean_over_problems():
    flags = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert mean_pass_at_k(flags, 1) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert mean_pass_at_k(flags, 2) == pytest.approx((0.5 + (1 - 1 / 6) + 0.0) / 3)


def test_bad_arguments():
    with pytest.raises(UserError, match=r"pass@5 needs 1 <= k <= the number of samples per problem \(4\)"):
        pass_at_k(4, 1, 5)
    with pytest.raises(UserError, match="correct=5 of samples=4"):
        pass_at_k(4, 5, 1)
    with pytest.raises(UserError, match="at least one problem"):
        mean_pass_at_k([], 1)
