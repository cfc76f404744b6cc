"""The embedded reasoning task: multi-digit addition with a column-by-column trace, checkable by code.

It stands in for R1-distilled traces so `openr1-jax sft` runs with no downloads. For "What is 347 + 285?" (3-digit
operands; the default is 2 digits, `load_rows(..., digits=3)` is harder) the assistant turn is

    <think>
    7+5+0=12
    4+8+1=13
    3+2+1=06
    </think>
    \\boxed{632}

Each trace line adds one column, least significant first: the two digits, the carry in, and the two-digit
column sum whose tens digit is the next carry. Every line has the same length, so each token sits at a fixed
distance from the digits it depends on: a tiny model learns the procedure in minutes instead of memorising
sums. The answer reads the ones digits bottom-up, led by the last carry when it is 1.

A flawed teacher: `load_rows(..., forget_carry=r)` writes the traces of a share r of the problems as someone who
forgets to carry would (every carry-in written as 0, the column sums and the boxed answer following from that),
while the `answer`/`solution` columns keep the true sum. The embedded base model was pretrained on such text
(`base_model.py`): it has seen the right procedure but mostly imitates the wrong one, which is what RL with a
verifiable reward then has to fix.

Splits are disjoint by construction: a hash of the unordered operand pair puts every problem (and its
commuted twin) in exactly one split, and each split draws from its own seeded stream.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from openr1_jax.errors import UserError

SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 20_000, "test": 400}  # capped by `max_rows` (2 digits: 3645 and 405)
DIGITS = 2  # default operand length (no leading zeros): a tiny MoE learns it in ~400 steps on CPU
TEST_FRACTION = 0.1  # share of all operand pairs that belong to the held-out split

_SPLIT_SEED = {"train": 0, "test": 1}


def split_of(a: int, b: int) -> str:
    """The split an operand pair belongs to; `a + b` and `b + a` always share it."""
    lo, hi = sorted((a, b))
    h = int.from_bytes(hashlib.blake2b(f"{lo}+{hi}".encode(), digest_size=8).digest(), "little")
    return "test" if (h % 10_000) < TEST_FRACTION * 10_000 else "train"


def problem_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def trace_lines(a: int, b: int, *, forget_carry: bool = False) -> list[str]:
    """One line `x+y+c=ss` per column, least significant first (operands padded with zeros to equal length).
    `forget_carry`: every carry-in is written (and added) as 0, the classic mistake."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    lines, carry = [], 0
    for x, y in zip(xs, ys):
        carry = 0 if forget_carry else carry
        total = int(x) + int(y) + carry
        lines.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return lines


def trace_answer(lines: list[str]) -> int:
    """The number a trace spells: the ones digits bottom-up, led by the last column's carry."""
    sums = [int(line.split("=")[1]) for line in lines]
    return int("".join(str(s % 10) for s in reversed(sums))) + (sums[-1] // 10) * 10 ** len(sums)


def solution_text(a: int, b: int, *, forget_carry: bool = False) -> str:
    lines = trace_lines(a, b, forget_carry=forget_carry)
    return "<think>\n" + "\n".join(lines) + "\n</think>\n\\boxed{" + str(trace_answer(lines)) + "}"


def make_row(a: int, b: int, *, forget_carry: bool = False) -> dict:
    problem = problem_text(a, b)
    return {
        "id": f"add-{a}-{b}",
        "problem": problem,
        "answer": str(a + b),
        "solution": str(a + b),  # the gold answer under the column name Open-R1's accuracy reward reads
        "messages": [
            {"role": "user", "content": problem},
            {"role": "assistant", "content": solution_text(a, b, forget_carry=forget_carry)},
        ],
    }


def _forgets(a: int, b: int, seed: int, rate: float) -> bool:
    """Whether the flawed teacher forgets its carries on (a, b): a hash draw, so it is the same for the same
    problem and seed however many rows are drawn."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{a}+{b}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < rate


def max_rows(split: str, digits: int = DIGITS) -> int:
    """How many distinct problems `load_rows` may draw from `split` (half its share of all operand pairs)."""
    share = TEST_FRACTION if split == "test" else 1.0 - TEST_FRACTION
    return int(0.5 * share * (9 * 10 ** (digits - 1)) ** 2)


def load_rows(
    split: str, num: int | None = None, *, seed: int = 0, digits: int = DIGITS, forget_carry: float = 0.0
) -> list[dict]:
    """`num` distinct problems of `split` ("train" or "test") with `digits`-digit operands, the same ones for
    the same arguments. A smaller `num` gives a prefix of a larger one, so growing a split never reshuffles it.
    `forget_carry`: the share of traces written by a teacher that forgets to carry (the gold answer stays true).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' of the embedded task: choose one of {', '.join(SPLITS)}")
    if not 1 <= digits <= 9:
        raise UserError(f"digits of the embedded task must be between 1 and 9, not {digits}")
    num = min(DEFAULT_SIZES[split], max_rows(split, digits)) if num is None else num
    if num < 0:
        raise UserError(f"number of rows for split '{split}' must be >= 0, not {num}")
    if not 0.0 <= forget_carry <= 1.0:
        raise UserError(f"forget_carry of the embedded task is a share between 0 and 1, not {forget_carry}")
    if num > max_rows(split, digits):
        raise UserError(
            f"split '{split}' of the embedded task with {digits}-digit operands has too few distinct problems "
            f"for {num} rows (at most {max_rows(split, digits)})"
        )
    lo, hi = 10 ** (digits - 1), 10**digits
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    rows, seen = [], set()
    while len(rows) < num:
        for a, b in rng.integers(lo, hi, size=(4096, 2)).tolist():
            if (a, b) in seen or split_of(a, b) != split:
                continue
            seen.add((a, b))
            rows.append(make_row(a, b, forget_carry=_forgets(a, b, seed, forget_carry)))
            if len(rows) == num:
                break
    return rows


_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` in `text` (nested braces allowed), or None if there is none whole."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def normalize_answer(text: str) -> str:
    """Drop whitespace, thousands separators and a trailing period; integers lose leading zeros and '+'."""
    s = re.sub(r"[\s,]", "", text).rstrip(".")
    if re.fullmatch(r"[+-]?\d+", s):
        return str(int(s))
    return s


def is_correct(completion: str, answer: str) -> bool:
    """True iff the last boxed expression of `completion` equals `answer` (after `normalize_answer`)."""
    boxed = extract_boxed(completion)
    return boxed is not None and normalize_answer(boxed) == normalize_answer(str(answer))
