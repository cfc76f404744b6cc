"""Open-R1's `code` reward: the fraction of a problem's test cases that the completion's program passes.

Semantics follow open-r1 (`code_reward` in src/open_r1/rewards.py): the program is the last ```python fenced block
of the completion (its last message for a conversation); `verification_info` (a dict or its JSON string) is
`{"language": "python", "test_cases": [{"input": str, "output": str, "type": "stdin_stdout"}, ...]}`; each case
feeds `input` on stdin, and it passes when the program exits 0 and its stdout, stripped, matches `output`,
stripped, line by line with each line stripped. No code block scores 0.0.

Where we differ, on purpose: open-r1 zips the output lines, so a program printing only the first of two expected
lines passes; here the line counts must match. Open-r1 runs all cases in one E2B sandbox, and one case timing out
makes the whole completion score 0; here each case runs in its own local sandbox (`openr1_jax.rl.sandbox`, no
network, limits) and a timeout fails only that case. A problem that cannot be scored (malformed
`verification_info`, another language, no test cases, or the sandbox itself failing) gets None, which the trainer
skips; a completion never makes the reward raise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.rl.sandbox import RunResult, SandboxConfig, run_many

_STDIO_TYPES = (None, "stdin_stdout")


def extract_code(completion: str, language: str = "python") -> str:
    """The last ```language fenced block ("" when there is none), as open-r1's `extract_code`."""
    blocks = re.findall(rf"```{re.escape(language)}\n(.*?)```", completion, re.DOTALL)
    return blocks[-1] if blocks else ""


def outputs_match(actual: str, expected: str) -> bool:
    """Stripped stdout equals the stripped expected output, line by line, each line stripped."""
    got, want = actual.strip().split("\n"), expected.strip().split("\n")
    return len(got) == len(want) and all(g.strip() == w.strip() for g, w in zip(got, want))


def parse_test_cases(info: Any, language: str = "python") -> list[tuple[str, str]]:
    """`(stdin, expected stdout)` pairs of one `verification_info`; ValueError when it cannot be scored."""
    if isinstance(info, str | bytes):
        info = json.loads(info)
    if not isinstance(info, dict):
        raise ValueError(f"verification_info must be a dict, not {type(info).__name__}")
    if info.get("language", language) != language:
        raise ValueError(f"verification_info is for {info.get('language')!r}, this reward runs {language!r}")
    cases = info.get("test_cases")
    if not isinstance(cases, list) or not cases:
        raise ValueError("verification_info has no test_cases")
    pairs = []
    for case in cases:
        if not isinstance(case, dict) or case.get("type") not in _STDIO_TYPES:
            raise ValueError(f"only stdin_stdout test cases run here, not {case!r:.80}")
        if not isinstance(case.get("input"), str) or not isinstance(case.get("output"), str):
            raise ValueError("a test case needs string 'input' and 'output'")
        pairs.append((case["input"], case["output"]))
    return pairs


def make_code_reward(
    language: str = "python",
    timeout_s: float = 5.0,
    num_parallel: int | None = None,
    memory_mb: int = 512,
    isolation: str = "auto",
    sandbox: SandboxConfig | dict | None = None,
) -> Callable[..., list[float | None]]:
    """The `code` reward. `timeout_s` (wall and CPU) and `memory_mb` are per test case, open-r1's 5 s by default;
    `sandbox` (a `SandboxConfig` or its fields as a dict, e.g. from YAML) replaces all the limits at once. Test
    cases of all completions run `num_parallel` at a time."""
    if language != "python":
        raise UserError(f"the code reward runs Python programs only, not '{language}'")
    if isinstance(sandbox, dict):
        unknown = sorted(set(sandbox) - set(SandboxConfig.__dataclass_fields__))
        if unknown:
            raise UserError(f"the code reward's sandbox has no option {', '.join(unknown)}")
        sandbox = SandboxConfig(**sandbox)
    cfg = sandbox or SandboxConfig(timeout_s=timeout_s, cpu_s=timeout_s, memory_mb=memory_mb, isolation=isolation)

    def code(completions: Sequence[Any], verification_info: Sequence[Any], **_: Any) -> list[float | None]:
        if len(verification_info) != len(completions):
            raise UserError(
                f"the code reward got {len(completions)} completions but {len(verification_info)} verification_info"
            )
        rewards: list[float | None] = [0.0] * len(completions)
        jobs, owners = [], []  # one sandbox run per test case; owners[j] = (completion, expected output)
        for i, (completion, info) in enumerate(zip(completions, verification_info)):
            try:
                cases = parse_test_cases(info, language)
            except (ValueError, TypeError):  # json.JSONDecodeError is a ValueError
                rewards[i] = None
                continue
            program = extract_code(_text(completion), language)
            if not program.strip():
                continue
            for stdin, expected in cases:
                jobs.append((program, stdin))
                owners.append((i, expected))
        results: list[RunResult] = run_many(jobs, cfg, num_parallel) if jobs else []
        passed = dict.fromkeys((i for i, _ in owners), 0)
        total = dict.fromkeys(passed, 0)
        broken = set()
        for (i, expected), result in zip(owners, results):
            total[i] += 1
            if result.killed_reason == "sandbox_error":
                broken.add(i)
            elif result.ok and outputs_match(result.stdout, expected):
                passed[i] += 1
        for i in passed:
            rewards[i] = None if i in broken else passed[i] / total[i]
        return rewards

    code.__name__ = "code"
    return code


def _text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of a conversation's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return _text(completion[-1])
    return ""
