"""Math-verify verdicts on hand-made generations and Open-R1's pass-rate band."""

import pytest

from openr1_jax.generate.config import FilterSection
from openr1_jax.generate.filters import MathFilter, pass_rate


@pytest.fixture(scope="module")
def math_filter():
    with MathFilter(FilterSection(math_verify=True, pass_rate_min=0.25, pass_rate_max=0.9)) as filt:
        yield filt


@pytest.mark.parametrize(
    "generation, reference, verdict",
    [
        ("<think>\n7+3+0=10\n</think>\n\\boxed{110}", "110", True),
        ("\\boxed{111}", "110", False),
        ("so x = \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{1/2}", "\\frac{1}{2}", True),
        ("first \\boxed{3}, then \\boxed{4}", "4", False),  # two boxed answers read as the set {3, 4}
        ("\\boxed{2}", "The sum is $\\boxed{2}$.", True),  # a full solution as the reference
        ("no answer here", "5", False),
        ("\\boxed{5}", "", None),  # nothing to compare against: undecided
    ],
)
def test_verdicts(math_filter, generation, reference, verdict):
    assert math_filter.verdicts([(generation, reference)]) == [verdict]


def test_pass_rate_ignores_undecided_verdicts():
    assert pass_rate([True, False, None, True]) == pytest.approx(2 / 3)
    assert pass_rate([None, None]) is None and pass_rate([]) is None


def test_annotate_records_verdicts_pass_rate_and_the_band(math_filter):
    records = [
        {"generations": ["\\boxed{3}", "\\boxed{4}", "\\boxed{3}", "\\boxed{3}"], "error": None},  # 3/4
        {"generations": ["\\boxed{9}", "\\boxed{9}"], "error": None},  # 2/2: too easy
        {"generations": ["\\boxed{1}"], "error": None},  # 0/1: too hard
        {"generations": [], "error": "connection refused"},
        {"generations": ["\\boxed{1}"], "error": None},  # no reference
    ]
    references = ["3", "9", "2", "7", None]
    math_filter.annotate(records, references)
    assert [r["verdicts"] for r in records] == [[True, False, True, True], [True, True], [False], [], [None]]
    assert [r["pass_rate"] for r in records] == [0.75, 1.0, 0.0, None, None]
    assert [r["kept"] for r in records] == [True, False, False, False, False]
