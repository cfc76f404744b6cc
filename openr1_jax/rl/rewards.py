"""GRPO rewards by name, with Open-R1's names and semantics, and user rewards by dotted path.

A reward is called as TRL calls one: `fn(completions, **kwargs) -> list[float | None]`. `completions` holds
strings or conversations (`[{"role": "assistant", "content": ...}]`, whose first message is read, as Open-R1
does); `kwargs` holds the dataset columns (one value per completion) plus `prompts` and `completion_ids`, and
whatever a reward does not use it ignores. None means "cannot score this one" (the trainer treats it as NaN).

A built-in reward never raises on a completion and never hangs on one: the text checks run in linear time
(Open-R1's regular expressions are replaced by scans with the same answers where backtracking could go
quadratic), and math-verify runs in worker processes killed after `timeout_s` (`openr1_jax.evaluate.pool`), so
it needs no `signal.alarm` and works off the main thread.

    REWARDS["accuracy"].columns      # ("solution",): dataset columns a reward reads
    fn = get_reward("cosine", max_len=2000)
    fn = get_reward("my_pkg.rewards:brevity")   # a user function, used as is
"""

from __future__ import annotations

import atexit
import difflib
import enum
import importlib
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openr1_jax.errors import UserError

RewardFn = Callable[..., list[float | None]]


@dataclass(frozen=True)
class RewardSpec:
    factory: Callable[..., RewardFn]  # (**options) -> reward function
    columns: tuple[str, ...] = ()  # dataset columns the reward reads
    help: str = ""


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, columns: Iterable[str] = (), help: str = ""):
    """Decorator: register a factory `(**options) -> RewardFn` under `name`."""

    def decorate(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in REWARDS:
            raise UserError(f"a reward named '{name}' is already registered")
        doc = (factory.__doc__ or "").strip().splitlines()
        REWARDS[name] = RewardSpec(factory, tuple(columns), help or (doc[0] if doc else ""))
        return factory

    return decorate


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as `name` built with `options`, or the function at a dotted path (`pkg.mod.fn` or
    `pkg.mod:fn`), which is used as is and takes no options."""
    spec = REWARDS.get(name)
    if spec is not None:
        _check_options(f"reward '{name}'", spec.factory, options)
        return _named(spec.factory(**options), name)
    if _is_path(name):
        if options:
            raise UserError(
                f"reward '{name}' is a user function and takes no options (got {', '.join(sorted(options))}); "
                "give it defaults or wrap it in a function of your own"
            )
        return _import_function(name)
    raise UserError(_unknown_message(name))


def required_columns(name: str) -> tuple[str, ...]:
    """Dataset columns the reward `name` reads; () for a user function (it reads what it likes)."""
    spec = REWARDS.get(name)
    if spec is not None:
        return spec.columns
    if _is_path(name):
        return ()
    raise UserError(_unknown_message(name))


def check_reward_columns(names: Sequence[str], columns: Iterable[str], where: str = "the dataset") -> None:
    """Fail before anything compiles when a reward needs a column that `where` lacks (or a name is unknown)."""
    available = sorted(columns)
    for name in names:
        for column in required_columns(name):
            if column not in available:
                raise UserError(
                    f"reward '{name}' reads the column '{column}', which {where} does not have "
                    f"(its columns: {', '.join(available) or 'none'})"
                )


def call_reward(name: str, fn: RewardFn, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Call a reward and check what it returns: one float or None per completion (NaN counts as None)."""
    values = fn(completions, **kwargs)
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"reward '{name}' returned {type(values).__name__}, not a list of floats") from None
    if len(values) != len(completions):
        raise UserError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
    out: list[float | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"reward '{name}' returned {value!r}, not a float or None") from None
        out.append(None if math.isnan(number) else number)
    return out


# ----------------------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------------------
def _is_path(name: str) -> bool:
    return "." in name or ":" in name


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(REWARDS), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return (
        f"unknown reward '{name}': {hint}available: {', '.join(sorted(REWARDS))}, "
        "or a dotted path such as my_pkg.rewards:my_reward"
    )


def _check_options(what: str, fn: Callable, options: dict[str, Any]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"{what} has no option {', '.join(unknown)}; its options are: {', '.join(allowed) or 'none'}")


def _named(fn: RewardFn, name: str) -> RewardFn:
    """Metrics are keyed by `__name__` (as TRL does), so a registered reward carries its registry name."""
    if getattr(fn, "__name__", None) == name:
        return fn

    def reward(completions, **kwargs):
        return fn(completions, **kwargs)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = getattr(fn, "__doc__", None)
    return reward


def _import_function(path: str) -> RewardFn:
    module_path, colon, attr = path.partition(":")
    if colon:
        candidates = [(module_path, attr)]
    else:  # the longest importable prefix is the module
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    for module_name, attr_path in candidates:
        if not module_name or not attr_path:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue  # no such module: try a shorter prefix
            raise UserError(f"importing '{module_name}' for reward '{path}' failed: {e}") from e
        except Exception as e:
            raise UserError(f"importing '{module_name}' for reward '{path}' failed: {type(e).__name__}: {e}") from e
        obj: Any = module
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                raise UserError(f"reward '{path}': module '{module_name}' has no attribute '{attr_path}'")
            obj = getattr(obj, part)
        if not callable(obj):
            raise UserError(f"reward '{path}' is a {type(obj).__name__}, not a function")
        return obj
    raise UserError(f"reward '{path}': no module of that path can be imported (is its package installed?)")


def completion_text(completion: Any) -> str | None:
    """The text of a completion: a string, or the first message's content as Open-R1 reads conversations."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
    elif isinstance(completion, list | tuple) and completion and isinstance(completion[0], dict):
        content = completion[0].get("content")
    else:
        return None
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) if texts else None
    return content if isinstance(content, str) else None


def _column(kwargs: dict[str, Any], column: str, n: int, reward: str) -> list[Any]:
    values = kwargs.get(column)
    if values is None:
        raise UserError(f"reward '{reward}' needs the '{column}' column, and none was passed")
    try:
        values = list(values)
    except TypeError:
        raise UserError(f"reward '{reward}': '{column}' must be a list with one value per completion") from None
    if len(values) != n:
        raise UserError(f"reward '{reward}' got {len(values)} '{column}' values for {n} completions")
    return values


def _text_reward(name: str, score: Callable[[str], float]) -> RewardFn:
    """A reward that scores each completion's text alone; an unreadable completion gets None."""

    def reward(completions, **kwargs):
        texts = [completion_text(c) for c in completions]
        return [None if t is None else score(t) for t in texts]

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = score.__doc__
    return reward


# ----------------------------------------------------------------------------------------------------------
# math correctness (accuracy, length, cosine): math-verify in bounded worker processes
# ----------------------------------------------------------------------------------------------------------
class Verdict(enum.Enum):
    CORRECT = "correct"
    WRONG = "wrong"  # including an answer whose check ran out of time (math-verify's own timeouts do the same)
    NO_GOLD = "no_gold"  # the gold solution does not parse
    UNKNOWN = "unknown"  # the completion is unreadable or the check failed


_GOLD_UNPARSEABLE = "gold answer is not parseable"  # openr1_jax.evaluate.scoring's word for it
_POOLS: dict[tuple[int, float], tuple[Any, threading.Lock]] = {}
_POOLS_LOCK = threading.Lock()


def _math_pool(num_workers: int, timeout_s: float):
    """One pool per (size, timeout) for the life of the process: workers start on first use and are reused."""
    from openr1_jax.evaluate.scoring import math_pool

    key = (int(num_workers), float(timeout_s))
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = (math_pool(*key), threading.Lock())
        return _POOLS[key]


def close_pools() -> None:
    """Stop the math-verify workers (also done at exit)."""
    with _POOLS_LOCK:
        for pool, lock in _POOLS.values():
            with lock:
                pool.close()
        _POOLS.clear()


atexit.register(close_pools)


def math_verdicts(
    completions: Sequence[Any], solutions: Sequence[Any], *, num_workers: int = 2, timeout_s: float = 10.0
) -> list[Verdict]:
    """Open-R1's accuracy check of each completion against its solution (`openr1_jax.evaluate.scoring`)."""
    from openr1_jax.evaluate.scoring import score_math_all

    verdicts: list[Verdict | None] = [None] * len(completions)
    pairs: dict[tuple[str, str], list[int]] = {}  # a group's G completions share a gold; repeats are scored once
    for i, (completion, solution) in enumerate(zip(completions, solutions, strict=True)):
        text = completion_text(completion)
        if text is None:
            verdicts[i] = Verdict.UNKNOWN
        elif solution is None or not str(solution).strip():
            verdicts[i] = Verdict.NO_GOLD
        else:
            pairs.setdefault((text, str(solution)), []).append(i)
    if pairs:
        pool, lock = _math_pool(num_workers, timeout_s)
        with lock:
            scores = score_math_all(list(pairs), pool=pool)
        for owners, s in zip(pairs.values(), scores, strict=True):
            if s.timed_out:
                verdict = Verdict.WRONG
            elif s.error == _GOLD_UNPARSEABLE:
                verdict = Verdict.NO_GOLD
            elif s.error is not None:
                verdict = Verdict.UNKNOWN
            else:
                verdict = Verdict.CORRECT if s.correct else Verdict.WRONG
            for i in owners:
                verdicts[i] = verdict
    return verdicts  # type: ignore[return-value]


def _check_pool_options(num_workers: int, timeout_s: float) -> None:
    try:
        ok = int(num_workers) >= 1 and float(timeout_s) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"math-verify needs num_workers >= 1 and timeout_s > 0, not {num_workers!r} and {timeout_s!r}")


@register_reward("accuracy", columns=("solution",), help="1 if math-verify finds the answer equal to the solution")
def _accuracy(*, num_workers: int = 2, timeout_s: float = 10.0) -> RewardFn:
    """Open-R1's accuracy_reward: 1.0 right, 0.0 wrong or out of time, None when the gold does not parse (or
    the check fails), so the sample is skipped rather than taught."""
    _check_pool_options(num_workers, timeout_s)

    def accuracy(completions, **kwargs):
        solutions = _column(kwargs, "solution", len(completions), "accuracy")
        values = {Verdict.CORRECT: 1.0, Verdict.WRONG: 0.0, Verdict.NO_GOLD: None, Verdict.UNKNOWN: None}
        verdicts = math_verdicts(completions, solutions, num_workers=num_workers, timeout_s=timeout_s)
        return [values[v] for v in verdicts]

    return accuracy


def _group_indices(kwargs: dict[str, Any], n: int) -> list[list[int]]:
    """Completions of the same prompt (the trainer passes `prompts`); without prompts the batch is one group."""
    prompts = kwargs.get("prompts")
    if prompts is None:
        return [list(range(n))]
    prompts = _column(kwargs, "prompts", n, "length")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt if isinstance(prompt, str) else repr(prompt), []).append(i)
    return list(groups.values())


@register_reward("length", columns=("solution",), help="Kimi 1.5 length reward: short right answers score most")
def _length(*, num_workers: int = 2, timeout_s: float = 10.0) -> RewardFn:
    """Kimi 1.5's length reward (Open-R1's len_reward), lengths in characters: with lambda = 0.5 - (len - min) /
    (max - min) over a prompt's completions, a right answer gets lambda and a wrong one min(0, lambda); all of
    one length -> 0. A gold that does not parse counts as right (Open-R1), a failed check gets None.

    Open-R1 takes min and max over the whole batch it is called with; here over each prompt's group, as the
    paper defines it (identical when the batch holds one prompt or no `prompts` are passed)."""
    _check_pool_options(num_workers, timeout_s)

    def length(completions, **kwargs):
        n = len(completions)
        solutions = _column(kwargs, "solution", n, "length")
        verdicts = math_verdicts(completions, solutions, num_workers=num_workers, timeout_s=timeout_s)
        texts = [completion_text(c) for c in completions]
        rewards: list[float | None] = [None] * n
        for group in _group_indices(kwargs, n):
            members = [i for i in group if texts[i] is not None]
            if not members:
                continue
            lengths = {i: len(texts[i]) for i in members}
            lo, hi = min(lengths.values()), max(lengths.values())
            for i in members:
                if verdicts[i] is Verdict.UNKNOWN:
                    continue
                if hi == lo:
                    rewards[i] = 0.0
                    continue
                lam = 0.5 - (lengths[i] - lo) / (hi - lo)
                rewards[i] = float(lam if verdicts[i] is not Verdict.WRONG else min(0.0, lam))
        return rewards

    return length


@register_reward("cosine", columns=("solution",), help="correctness scaled by length on a cosine schedule")
def _cosine(
    *,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    num_workers: int = 2,
    timeout_s: float = 10.0,
) -> RewardFn:
    """Open-R1's cosine_scaled_reward: with c = cos(pi * len / max_len) (len in characters, not clipped, as
    Open-R1), a right answer gets min_value_correct + (max_value_correct - min_value_correct) * (1 + c) / 2, so
    shorter is better, and a wrong one goes from min_value_wrong (short) to max_value_wrong (at max_len), so a
    long wrong answer is punished less than a hasty one. A gold that does not parse gives 1.0 (Open-R1)."""
    _check_pool_options(num_workers, timeout_s)
    if not max_len > 0:
        raise UserError(f"cosine reward: max_len must be positive, not {max_len}")

    def cosine(completions, **kwargs):
        solutions = _column(kwargs, "solution", len(completions), "cosine")
        verdicts = math_verdicts(completions, solutions, num_workers=num_workers, timeout_s=timeout_s)
        rewards: list[float | None] = []
        for completion, verdict in zip(completions, verdicts):
            if verdict is Verdict.UNKNOWN:
                rewards.append(None)
                continue
            if verdict is Verdict.NO_GOLD:
                rewards.append(1.0)
                continue
            c = math.cos(math.pi * len(completion_text(completion)) / max_len)
            if verdict is Verdict.CORRECT:
                start, end = min_value_correct, max_value_correct
            else:
                start, end = max_value_wrong, min_value_wrong
            rewards.append(float(start + 0.5 * (end - start) * (1.0 + c)))
        return rewards

    return cosine


# ----------------------------------------------------------------------------------------------------------
# format rewards
# ----------------------------------------------------------------------------------------------------------
_THINK_ANSWER = "\n</think>\n<answer>\n"
_ANSWER_END = "\n</answer>"


def _ends_line(text: str, end: int) -> bool:
    """Python's `$` under re.MULTILINE: at the end of the text or before a newline."""
    return end == len(text) or text[end] == "\n"


def _find_line_end_marker(text: str, marker: str, start: int) -> bool:
    """Is there `marker` at or after `start` that ends a line? (One forward scan.)"""
    at = text.find(marker, start)
    while at >= 0:
        if _ends_line(text, at + len(marker)):
            return True
        at = text.find(marker, at + 1)
    return False


def matches_think_answer(text: str) -> bool:
    """re.match(r"^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$", text, DOTALL | MULTILINE), in linear
    time: the earliest `</think>` that fits leaves the most room for the rest, so one scan decides."""
    if not text.startswith("<think>\n"):
        return False
    mid = text.find(_THINK_ANSWER, len("<think>\n"))
    return mid >= 0 and _find_line_end_marker(text, _ANSWER_END, mid + len(_THINK_ANSWER))


def matches_think_code(text: str, language: str) -> bool:
    """Open-R1's code format, `^<think>\\n.*?\\n</think>\\n<answer>\\n.*?```LANG.*?```.*?\\n</answer>$` (DOTALL,
    MULTILINE), in linear time by taking each piece at its earliest position."""
    if not text.startswith("<think>\n"):
        return False
    mid = text.find(_THINK_ANSWER, len("<think>\n"))
    if mid < 0:
        return False
    fence = "```" + language
    opening = text.find(fence, mid + len(_THINK_ANSWER))
    if opening < 0:
        return False
    closing = text.find("```", opening + len(fence))
    return closing >= 0 and _find_line_end_marker(text, _ANSWER_END, closing + 3)


def ends_in_boxed(text: str, start: int = 0) -> bool:
    """Does `text` end (but for whitespace) in a whole `\\boxed{...}` that begins at or after `start`? The
    closing brace is matched backwards, one scan, so no run of unclosed boxes makes it quadratic."""
    text = text.rstrip()
    if not text.endswith("}"):
        return False
    depth = 0
    for i in range(len(text) - 1, start - 1, -1):
        depth += {"}": 1, "{": -1}.get(text[i], 0)
        if depth == 0:
            head = text[start:i].rstrip(" \t")
            return head.endswith("\\boxed")
    return False


def matches_think_boxed(text: str) -> bool:
    """`<think>\\n...\\n</think>\\n` then text that ends in a whole `\\boxed{...}` (trailing whitespace allowed):
    the embedded task's format (openr1_jax.data.embedded.task)."""
    if not text.startswith("<think>\n"):
        return False
    mid = text.find("\n</think>\n", len("<think>\n"))
    return mid >= 0 and ends_in_boxed(text, mid + len("\n</think>\n"))


@register_reward("format", help="1 if the completion is <think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>")
def _format(*, answer: str = "tag") -> RewardFn:
    """Open-R1's format_reward: 1.0 for `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`, else 0.0.
    `answer="boxed"` asks for the think block followed by an answer ending in `\\boxed{...}` instead."""
    checks = {"tag": matches_think_answer, "boxed": matches_think_boxed}
    if answer not in checks:
        raise UserError(f"format reward: answer must be 'tag' or 'boxed', not {answer!r}")
    check = checks[answer]

    def score(text: str) -> float:
        return 1.0 if check(text) else 0.0

    return _text_reward("format", score)


@register_reward("tag_count", help="0.25 for each of the four format tags present exactly once")
def _tag_count() -> RewardFn:
    """Open-R1's tag_count_reward: 0.25 each for exactly one `<think>\\n`, `\\n</think>\\n`, `\\n<answer>\\n`
    and `\\n</answer>`, so a model is led to the format step by step."""

    def score(text: str) -> float:
        tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
        return 0.25 * sum(text.count(tag) == 1 for tag in tags)

    return _text_reward("tag_count", score)


@register_reward("reasoning_steps", help="min(1, steps / 3) counting 'Step N:', lists, bullets, First/Next/Finally")
def _reasoning_steps() -> RewardFn:
    """Open-R1's reasoning_steps_reward: counts `Step N:`, a `N.` at the very start of the text (Open-R1's
    pattern has no MULTILINE flag), `\\n-`, `\\n*`, `First,`, `Second,`, `Next,`, `Finally,`; 3 or more -> 1."""
    pattern = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")

    def score(text: str) -> float:
        return min(1.0, len(pattern.findall(text)) / 3)

    return _text_reward("reasoning_steps", score)


@register_reward("code_format", help="format with a ```LANG code block inside <answer>")
def _code_format(*, language: str = "python") -> RewardFn:
    """Open-R1's code_format_reward; a `language` dataset column, when passed, overrides the option per row."""

    def code_format(completions, **kwargs):
        n = len(completions)
        languages = _column(kwargs, "language", n, "code_format") if "language" in kwargs else [language] * n
        texts = [completion_text(c) for c in completions]
        return [
            None if t is None else (1.0 if matches_think_code(t, str(lang)) else 0.0)
            for t, lang in zip(texts, languages)
        ]

    return code_format


# ----------------------------------------------------------------------------------------------------------
# length and repetition penalties
# ----------------------------------------------------------------------------------------------------------
@register_reward("repetition_penalty", help="n-gram repetition penalty, from 0 down to max_penalty")
def _repetition_penalty(*, ngram_size: int = 3, max_penalty: float = -1.0, language: str = "en") -> RewardFn:
    """Open-R1's repetition penalty (Yeo et al. 2025, app. C.2): (1 - unique n-grams / n-grams) * max_penalty
    over lower-cased words (en) or jieba segments (zh); texts shorter than one n-gram get 0."""
    if max_penalty > 0:
        raise UserError(f"repetition_penalty: max_penalty {max_penalty} should not be positive")
    if int(ngram_size) < 1:
        raise UserError(f"repetition_penalty: ngram_size must be >= 1, not {ngram_size}")
    n = int(ngram_size)
    if language == "en":

        def words(text: str) -> list[str]:
            return text.lower().split()

    elif language == "zh":
        try:
            import jieba
        except ImportError:
            raise UserError("repetition_penalty with language 'zh' needs jieba: pip install jieba") from None

        def words(text: str) -> list[str]:
            return list(jieba.cut(text))

    else:
        raise UserError(f"repetition_penalty: language must be 'en' or 'zh', not {language!r}")

    def score(text: str) -> float:
        tokens = words(text) if text else []
        if len(tokens) < n:
            return 0.0
        ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty

    return _text_reward("repetition_penalty", score)


@register_reward("soft_overlong_punishment", help="DAPO's soft penalty for completions near or past the limit")
def _soft_overlong_punishment(*, max_completion_len: int = 16384, soft_punish_cache: int = 4096) -> RewardFn:
    """DAPO eq. 13 (Open-R1's soft_overlong_punishment), lengths in tokens from `completion_ids`: 0 up to
    L_max - L_cache, then falling linearly to -1 at L_max, and -1 beyond."""
    if max_completion_len < 1 or not 0 <= soft_punish_cache <= max_completion_len:
        raise UserError(
            "soft_overlong_punishment needs max_completion_len >= 1 and 0 <= soft_punish_cache <= "
            f"max_completion_len, not {max_completion_len} and {soft_punish_cache}"
        )
    free = max_completion_len - soft_punish_cache

    def soft_overlong_punishment(completions, **kwargs):
        ids = _column(kwargs, "completion_ids", len(completions), "soft_overlong_punishment")
        rewards: list[float | None] = []
        for row in ids:
            try:
                length = len(row)
            except TypeError:
                rewards.append(None)
                continue
            if length <= free:
                rewards.append(0.0)
            elif length <= max_completion_len:
                rewards.append((free - length) / soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment


# ----------------------------------------------------------------------------------------------------------
# code (the sandbox lives in openr1_jax.rl.code_reward)
# ----------------------------------------------------------------------------------------------------------
@register_reward("code", columns=("verification_info",), help="fraction of test cases the program passes")
def _code(**options: Any) -> RewardFn:
    """Open-R1's code_reward: the last ```python block runs in the sandbox on each test case of
    `verification_info`; the score is the fraction passed."""
    from openr1_jax.rl.code_reward import make_code_reward

    _check_options("reward 'code'", make_code_reward, options)
    return make_code_reward(**options)


@register_reward("binary_code", columns=("verification_info",), help="1 if the program passes every test case")
def _binary_code(**options: Any) -> RewardFn:
    """Open-R1's binary_code_reward: the code reward thresholded at 0.99."""
    code = _code(**options)

    def binary_code(completions, **kwargs):
        return [None if r is None else (1.0 if r > 0.99 else 0.0) for r in code(completions, **kwargs)]

    return binary_code
