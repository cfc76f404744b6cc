"""Is a completion right? Math answers by math-verify with Open-R1's settings; multiple choice by its letter.

Math follows Open-R1's `accuracy_reward`: the gold answer is parsed with math-verify's default extraction (LaTeX,
then plain expressions), the completion with LaTeX extraction only, `\\boxed{}` first, well-formed LaTeX
required (`nits`, `malformed_operators` off), no match without an anchor ("final answer is", a box), and
`verify(gold, answer)` decides. A bare gold answer such as MATH-500's `\\left( 3, \\frac{\\pi}{2} \\right)` is
read as LaTeX by wrapping it in `$...$` (unwrapped, math-verify reads only its first number).

math-verify's own `signal.alarm` timeouts are switched off (they fail outside the main thread); `score_math_all`
runs the calls in worker processes that are killed after `timeout_s` instead. A timed-out answer scores 0 and is
reported as such.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from openr1_jax.evaluate.pool import BoundedPool

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _NoDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here that is the design, not a risk."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoDisabledTimeoutWarning())


@dataclass(frozen=True)
class Score:
    correct: bool
    extracted: str | None = None  # the answer as found in the completion (a string, never a sympy object)
    timed_out: bool = False
    error: str | None = None  # e.g. "gold answer is not parseable", or a scorer failure


# ----------------------------------------------------------------------------------------------------------
# math (math-verify)
# ----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _answer_config():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
            ),
            boxed_match_priority=0,  # a \boxed{} answer is taken before any "final answer is" sentence
            try_extract_without_anchor=False,
        )
    ]


def gold_text(answer: str) -> str:
    """The gold answer as math-verify should read it: bare LaTeX gets `$...$` so it is parsed whole."""
    answer = str(answer).strip()
    if "$" in answer or "\\boxed" in answer or "\\(" in answer or "\\[" in answer:
        return answer
    return f"${answer}$"


@lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    from math_verify import parse

    return parse(gold_text(answer), extraction_mode="first_match", parsing_timeout=None)


def _matched_text(parsed: list) -> str | None:
    """math-verify returns [sympy value, matched string]; report the string (str() of sympy can hang)."""
    strings = [p for p in parsed if isinstance(p, str)]
    return strings[-1] if strings else None


def score_math(completion: str, answer: str) -> Score:
    """Open-R1's accuracy check of one completion, in this process and with no time limit (see `score_math_all`)."""
    from math_verify import parse, verify

    gold = _parse_gold(str(answer))
    if not gold:
        return Score(False, error="gold answer is not parseable")
    parsed = parse(completion, extraction_config=_answer_config(), extraction_mode="first_match", parsing_timeout=None)
    if not parsed:
        return Score(False)
    return Score(bool(verify(gold, parsed, timeout_seconds=None)), extracted=_matched_text(parsed))


def math_pool(num_workers: int = 2, timeout_s: float = 10.0) -> BoundedPool:
    """Worker processes for `score_math_all`, forked from a server that has imported math-verify and sympy once."""
    return BoundedPool(num_workers, timeout_s, preload=[__name__, "math_verify", "latex2sympy2_extended"])


def score_math_all(
    pairs: Sequence[tuple[str, str]], *, num_workers: int = 2, timeout_s: float = 10.0, pool: BoundedPool | None = None
) -> list[Score]:
    """`score_math` of each (completion, answer) pair in worker processes; a call past `timeout_s` scores 0.

    Pass a `pool` to reuse its workers across calls (its own size and timeout then apply).
    """
    if pool is None:
        with math_pool(num_workers, timeout_s) as own:
            return score_math_all(pairs, pool=own)
    scores = []
    for result in pool.map(score_math, list(pairs)):
        if result.timed_out:
            scores.append(Score(False, timed_out=True, error=f"scoring took longer than {pool.timeout_s:g}s"))
        elif result.error is not None:
            scores.append(Score(False, error=result.error))
        else:
            scores.append(result.value)
    return scores


# ----------------------------------------------------------------------------------------------------------
# multiple choice
# ----------------------------------------------------------------------------------------------------------
# Decoration allowed between an anchor and the letter: spaces, markdown bold, math mode, brackets, \text{...}.
_DECOR = r"[\s*_$({\[]*(?:\\(?:text|textbf|mathrm|mathbf|boxed)\s*\{\s*)?[\s*_$({\[]*"


@lru_cache(maxsize=32)
def _choice_patterns(letters: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    group = f"([{letters}])"
    end = r"(?![A-Za-z0-9])"
    anchored = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*:?|:)" + _DECOR + group + end)
    boxed = re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?\(?" + group + end)
    alone = re.compile(r"^[\s*_$({\[]*" + group + r"[\s*_$)}\].:]*$")
    return anchored, boxed, alone


def extract_choice(completion: str, num_choices: int = 4) -> str | None:
    """The letter a completion picks among the first `num_choices`: its last "Answer: X" / "the answer is (X)",
    else its last `\\boxed{X}`, else a last line holding only the letter. Upper-case letters only, so the
    article "a" is never read as choice A."""
    letters = LETTERS[:num_choices]
    anchored, boxed, alone = _choice_patterns(letters)
    for pattern in (anchored, boxed):
        found = pattern.findall(completion)
        if found:
            return found[-1]
    lines = [line for line in completion.splitlines() if line.strip()]
    if lines:
        match = alone.match(lines[-1])
        if match:
            return match.group(1)
    return None


def score_choice(completion: str, gold_letter: str, num_choices: int = 4) -> Score:
    picked = extract_choice(completion, num_choices)
    return Score(picked is not None and picked == gold_letter.strip().upper(), extracted=picked)
