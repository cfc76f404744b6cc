"""Scoring: math-verify with Open-R1's settings, the letter of a multiple-choice answer, and the time bound."""

import time

import pytest

from openr1_jax.errors import UserError
from openr1_jax.evaluate.pool import BoundedPool
from openr1_jax.evaluate.scoring import extract_choice, gold_text, score_choice, score_math, score_math_all

# An answer on which sympy's comparison runs for minutes (it tries to evaluate the tower).
PATHOLOGICAL = ("\\boxed{10^{10^{10^{10}}}}", "3")


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("so the answer is \\boxed{0.5}", "\\frac{1}{2}"),
        ("Therefore, the final answer is: $\\boxed{\\frac{14}{3}}$. I hope it is correct", "\\frac{14}{3}"),
        ("<think>\n7+5+0=12\n4+8+1=13\n</think>\n\\boxed{132}", "132"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # bare LaTeX gold, read whole
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("The final answer is $5$", "5"),  # an anchor without a box
        ("\\boxed{10\\%}", "10\\%"),
    ],
)
def test_math_equivalent_answers_score_1(completion, answer):
    score = score_math(completion, answer)
    assert score.correct, score
    assert score.extracted is not None and not score.timed_out and score.error is None


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{633}", "632"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("the answer is 632", "632"),  # no anchor math-verify accepts without LaTeX: Open-R1 scores it 0
        ("", "632"),
        ("\\boxed{\\frac12}", "0.5"),  # malformed LaTeX is not repaired (malformed_operators=False)
        ("\\boxed{5} then \\boxed{6}", "6"),  # boxed="all": both boxes form the answer {5, 6}
    ],
)
def test_math_wrong_or_missing_answers_score_0(completion, answer):
    assert not score_math(completion, answer).correct


def test_missing_answer_and_unparseable_gold_are_told_apart():
    assert score_math("no box here", "4").extracted is None
    bad_gold = score_math("\\boxed{4}", "")
    assert not bad_gold.correct and bad_gold.error == "gold answer is not parseable"


def test_gold_text_wraps_only_bare_latex():
    assert gold_text("\\frac{1}{2}") == "$\\frac{1}{2}$"
    assert gold_text("$\\frac{1}{2}$") == "$\\frac{1}{2}$"
    assert gold_text("so \\boxed{3}") == "so \\boxed{3}"


def test_score_math_all_in_workers_matches_in_process_and_bounds_a_pathological_answer():
    pairs = [("\\boxed{0.5}", "\\frac{1}{2}"), PATHOLOGICAL, ("\\boxed{7}", "8"), ("\\boxed{42}", "42")]
    start = time.perf_counter()
    scores = score_math_all(pairs, num_workers=2, timeout_s=2.0)
    elapsed = time.perf_counter() - start
    assert [s.correct for s in scores] == [True, False, False, True]
    assert scores[1].timed_out and "longer than 2s" in scores[1].error
    assert not any(s.timed_out for s in (scores[0], scores[2], scores[3]))
    assert scores[0].extracted == "0.5"
    assert elapsed < 30  # the stuck call was killed at 2 s, not waited for


def test_pool_kills_a_slow_call_and_keeps_serving():
    with BoundedPool(num_workers=1, timeout_s=0.5) as pool:
        results = pool.map(time.sleep, [(60,), (0,), (0.01,)])
        assert results[0].timed_out and results[0].value is None
        assert results[1].ok and results[2].ok
        assert pool.timeouts == 1
        again = pool.map(divmod, [(7, 2), (1, 0)])  # the replacement worker runs further calls
    assert again[0].value == (3, 1)
    assert again[1].error.startswith("ZeroDivisionError")


def test_pool_rejects_bad_sizes():
    with pytest.raises(UserError, match="at least one worker"):
        BoundedPool(num_workers=0)
    with pytest.raises(UserError, match="timeout must be positive"):
        BoundedPool(timeout_s=0)


@pytest.mark.parametrize(
    "completion, letter",
    [
        ("Let me think.\nAnswer: B", "B"),
        ("A is wrong, C is wrong.\n\nAnswer: D", "D"),
        ("The answer is (C).", "C"),
        ("The correct answer is $\\boxed{A}$", "A"),
        ("**Answer: C**", "C"),
        ("Answer: $B$", "B"),
        ("so \\boxed{\\text{D}}", "D"),
        ("...\nB", "B"),
        ("...\n(C)", "C"),
        ("Answer: A\nwait, no. Answer: C", "C"),  # the last answer counts
        ("The answer is a bit unclear", None),  # the article is not choice A
        ("Answer: E", None),  # not among 4 options
        ("no idea", None),
    ],
)
def test_extract_choice(completion, letter):
    assert extract_choice(completion, 4) == letter


def test_score_choice():
    assert score_choice("Answer: B", "B").correct
    assert score_choice("Answer: B", "b").correct
    wrong = score_choice("Answer: A", "B")
    assert not wrong.correct and wrong.extracted == "A"
    assert score_choice("Answer: E", "E", num_choices=5).correct
