"""pass@k from n samples per problem: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language
Models Trained on Code"), as DeepSeek-R1 and lighteval report it.

With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples drawn
without replacement from the n include a correct one. The binomials overflow floats for long runs (n = 64,
k = 32 is already ~1.8e18), so the ratio is taken as the product prod_{i=n-c+1}^{n} (1 - k/i), every factor in
[0, 1]. pass@1 reduces to c/n, the mean correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

from openr1_jax.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimated probability that at least one of k samples is correct, given c correct among n."""
    if not 0 <= c <= n:
        raise UserError(f"pass@k needs 0 <= correct <= samples, not correct={c} of samples={n}")
    if not 1 <= k <= n:
        raise UserError(f"pass@{k} needs 1 <= k <= the number of samples per problem ({n})")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct_per_problem: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, each given as its samples' correct flags (all problems need >= k)."""
    if not correct_per_problem:
        raise UserError("pass@k needs at least one problem")
    values = [pass_at_k(len(flags), sum(bool(f) for f in flags), k) for flags in correct_per_problem]
    return sum(values) / len(values)
