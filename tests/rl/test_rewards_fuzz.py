"""Fuzzed rewards: on arbitrary text, unicode, odd LaTeX and huge strings no reward raises or hangs, and the
linear-time format checks agree with Open-R1's regular expressions."""

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openr1_jax.rl.rewards import get_reward, matches_think_answer, matches_think_boxed, matches_think_code

FUZZ = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

# Pieces the rewards look for, so random texts often come close to matching.
FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "\n", "\n\n", " ", "x", "\\boxed{", "\\boxed", "{", "}",
    "\\frac{", "\\frac", "$", "$$", "\\(", "\\)", "\\[", "\\]", "\\left(", "\\right)", "^{", "_", "\\sqrt{", "1",
    "42", "0.5", "-", "/", "=", "\\", "%", "\\text{", "\\begin{matrix}", "&", "\\end{matrix}", "Step 1:",
    "First,", "Finally,", "\n-", "\n*", "1.", "```", "```python\n", "答案", "\u0000", "\ud7ff", "\U0001f600",
    "\u202e", "final answer is ",
]  # fmt: skip
pieces = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=8), max_size=40).map("".join)
texts = st.one_of(st.text(max_size=300), pieces)
completions = st.one_of(texts, texts.map(lambda t: [{"role": "assistant", "content": t}]))
golds = st.one_of(st.sampled_from(["632", "\\frac{63}{400}", "$x^2$", "\\boxed{3}", "", "$$", "\\"]), pieces)


TEXT_REWARDS = [
    ("format", {}),
    ("format", {"answer": "boxed"}),
    ("tag_count", {}),
    ("reasoning_steps", {}),
    ("repetition_penalty", {}),
    ("repetition_penalty", {"ngram_size": 1, "max_penalty": -0.5}),
    ("code_format", {}),
    ("soft_overlong_punishment", {"max_completion_len": 64, "soft_punish_cache": 16}),
]


def call(fn, batch, **columns):
    ids = [list(range(len(str(c)) % 97)) for c in batch]
    return fn(batch, completion_ids=ids, prompts=["p"] * len(batch), **columns)


def check(values, n, low=-1.0, high=1.0):
    assert len(values) == n
    for v in values:
        assert v is None or (isinstance(v, float) and low - 1e-9 <= v <= high + 1e-9), v


@pytest.mark.parametrize("name, options", TEXT_REWARDS)
@FUZZ
@given(batch=st.lists(completions, min_size=1, max_size=6))
def test_text_rewards_never_raise(name, options, batch):
    start = time.perf_counter()
    check(call(get_reward(name, **options), batch), len(batch))
    assert time.perf_counter() - start < 5


@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(completions, golds), min_size=1, max_size=4))
def test_math_rewards_never_raise_or_hang(batch):
    items, solutions = [c for c, _ in batch], [g for _, g in batch]
    start = time.perf_counter()
    for name in ("accuracy", "length", "cosine"):
        values = call(get_reward(name, timeout_s=2.0), items, solution=solutions)
        check(values, len(items))
        if name == "accuracy":
            assert all(v in (0.0, 1.0, None) for v in values)
    assert time.perf_counter() - start < 3 * len(items) * 2.0 + 10  # each check is killed at timeout_s


@pytest.mark.parametrize(
    "junk",
    [None, 3, [], [None], {"content": None}, [{"content": 5}], b"bytes"],
)
def test_unreadable_completions_score_none(junk):
    for name, options in TEXT_REWARDS:
        if name != "soft_overlong_punishment":  # that one reads completion_ids only
            assert get_reward(name, **options)([junk, "ok"])[0] is None
    for name in ("accuracy", "cosine"):
        assert get_reward(name, timeout_s=2.0)([junk], solution=["1"]) == [None]


# Texts on which a backtracking regex, a brace matcher or sympy would take long.
HUGE = [
    "<think>\n" + "\n</think>\n<answer>\n" * 50_000,  # Open-R1's format regex goes quadratic here
    "<think>\n" + "\n</think>\n<answer>\n```python" * 30_000 + "```" * 30_000,
    "\\boxed{" * 200_000,
    "{" * 300_000 + "}" * 300_000 + "\\boxed{1}",
    "Step " + "1" * 500_000,
    "word " * 300_000,
    "\U0001f600" * 500_000,
    "x" * 2_000_000,
]


@pytest.mark.parametrize("text", HUGE, ids=range(len(HUGE)))
def test_text_rewards_stay_linear_on_huge_inputs(text):
    for name, options in TEXT_REWARDS:
        start = time.perf_counter()
        check(call(get_reward(name, **options), [text]), 1)
        assert time.perf_counter() - start < 5, name


def test_math_rewards_bounded_on_huge_and_pathological_latex():
    fn = get_reward("accuracy", timeout_s=2.0)
    batch = [
        "\\boxed{" + "1+" * 100_000 + "1}",
        "\\boxed{" + "\\frac{1}{" * 2_000 + "2" + "}" * 2_000 + "}",
        "\\boxed{10^{10^{10^{10}}}}",
        "$" * 100_000,
        "\\boxed{1}",
    ]
    start = time.perf_counter()
    values = fn(batch, solution=["3", "1", "3", "1", "1"])
    assert time.perf_counter() - start < 30
    assert values[-1] == 1.0 and all(v in (0.0, None) for v in values[:-1])


# ----------------------------------------------------------------------------------------------------------
# the linear-time checks say exactly what Open-R1's regular expressions say
# ----------------------------------------------------------------------------------------------------------
TAG_UNITS = ["<think>\n", "\n</think>\n", "<answer>\n", "\n</answer>", "</answer>", "\n", "a", "```", "```python"]
tag_bits = st.lists(st.sampled_from(TAG_UNITS), max_size=4).map("".join)
TAG_PIECES = st.one_of(  # random runs of the units, and the format with random bits in and around it
    st.lists(st.sampled_from(TAG_UNITS), max_size=14).map("".join),
    st.tuples(tag_bits, tag_bits, tag_bits, tag_bits).map(
        lambda p: f"<think>\n{p[0]}\n</think>\n<answer>\n{p[1]}```python{p[2]}```\n</answer>{p[3]}"
    ),
    st.tuples(tag_bits, tag_bits, tag_bits).map(lambda p: f"{p[0]}<think>\n{p[1]}\n</think>\n<answer>\n{p[2]}"),
)
THINK_ANSWER = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)
THINK_CODE = re.compile(
    r"^<think>\n.*?\n</think>\n<answer>\n.*?```python.*?```.*?\n</answer>$", re.DOTALL | re.MULTILINE
)


@settings(deadline=None, max_examples=400)
@given(text=TAG_PIECES)
def test_linear_format_checks_equal_the_regexes(text):
    assert matches_think_answer(text) == bool(THINK_ANSWER.match(text))
    assert matches_think_code(text, "python") == bool(THINK_CODE.match(text))


BOX_UNITS = ["<think>\n", "\n</think>\n", "\\boxed", "\\boxed{", "{", "}", "1", " ", "\n", "\t"]
box_bits = st.lists(st.sampled_from(BOX_UNITS), max_size=4).map("".join)
BOX_PIECES = st.one_of(
    st.lists(st.sampled_from(BOX_UNITS), max_size=12).map("".join),
    st.tuples(box_bits, box_bits, st.sampled_from(["", " ", "\t"]), box_bits, box_bits).map(
        lambda p: f"<think>\n{p[0]}\n</think>\n{p[1]}\\boxed{p[2]}{{{p[3]}}}{p[4]}"
    ),
)


def boxed_by_regex(text):
    """The boxed format the slow way: a box after the think block whose braces close exactly at the end."""
    match = re.match(r"<think>\n.*?\n</think>\n", text, re.DOTALL)
    if not match:
        return False
    body = text.rstrip()
    for start in (m.start() for m in re.finditer(r"\\boxed[ \t]*\{", body)):
        if start < match.end():
            continue
        depth, i = 0, body.index("{", start)
        for j in range(i, len(body)):
            depth += {"{": 1, "}": -1}.get(body[j], 0)
            if depth == 0:
                if j == len(body) - 1:
                    return True
                break
    return False


@settings(deadline=None, max_examples=400)
@given(text=BOX_PIECES)
def test_boxed_format_check_equals_the_slow_definition(text):
    assert matches_think_boxed(text) == boxed_by_regex(text)
