"""Open-R1's `code` reward in the sandbox: right programs score 1, partial ones a fraction, hostile ones 0."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from openr1_jax.errors import UserError
from openr1_jax.rl.code_reward import extract_code, make_code_reward, outputs_match, parse_test_cases
from tests.rl.test_sandbox import REPO, assert_host_fine

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux namespaces")

SQUARE = {
    "language": "python",
    "test_cases": [
        {"input": "2\n", "output": "4\n", "type": "stdin_stdout"},
        {"input": "3\n", "output": "9\n", "type": "stdin_stdout"},
        {"input": "-5\n", "output": "25", "type": "stdin_stdout"},
        {"input": "10\n", "output": "100\n", "type": "stdin_stdout"},
    ],
}


def answer(code: str, preface: str = "Here is my solution.") -> str:
    return f"<think>\nthinking\n</think>\n{preface}\n```python\n{textwrap.dedent(code).strip()}\n```\n"


@pytest.fixture(scope="module")
def code_reward():
    return make_code_reward(timeout_s=2.0, num_parallel=8)


# ----------------------------------------------------------------------------------------------------------
# open-r1's parsing
# ----------------------------------------------------------------------------------------------------------
def test_extract_code_takes_the_last_python_block():
    text = "```python\nfirst()\n```\nthen\n```python\nsecond()\n```\n```js\nthird()\n```"
    assert extract_code(text) == "second()\n"
    assert extract_code("no code at all") == ""
    assert extract_code("```py\nx = 1\n```") == ""  # only ```python, as open-r1
    assert extract_code("```python\nunterminated") == ""
    assert extract_code("```cpp\nint main(){}\n```", "cpp") == "int main(){}\n"


def test_outputs_match_line_by_line():
    assert outputs_match("4\n", "4")
    assert outputs_match("  1 2  \r\n3\n\n", "1 2\n3")
    assert not outputs_match("1\n", "1\n2\n")  # open-r1's zip() would pass this prefix; we do not
    assert not outputs_match("1\n2\n", "1\n")
    assert not outputs_match("12", "1 2")
    assert outputs_match("", "")


def test_parse_test_cases():
    assert parse_test_cases(SQUARE)[0] == ("2\n", "4\n")
    assert parse_test_cases(json.dumps(SQUARE)) == parse_test_cases(SQUARE)
    assert parse_test_cases({"test_cases": [{"input": "", "output": "x"}]}) == [("", "x")]  # type, language optional
    for bad in ["{not json", [], {"test_cases": []}, {"language": "cpp", "test_cases": SQUARE["test_cases"]}]:
        with pytest.raises(ValueError):
            parse_test_cases(bad)
    with pytest.raises(ValueError, match="stdin_stdout"):
        parse_test_cases({"test_cases": [{"input": "", "output": "", "type": "function_call"}]})


# ----------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------
def test_right_partial_wrong_and_missing_programs(code_reward):
    completions = [
        answer("print(int(input()) ** 2)"),  # all four
        answer("n = int(input())\nprint(n * n if n > 0 else 0)"),  # not the negative one: 3/4
        answer("n = int(input())\nprint(4 if n == 2 else n)"),  # 2 -> 4 only: 1/4
        answer("print(int(input()) * 2)"),  # 2 -> 4 only: 1/4
        answer("print(int(input()) ** 2)\nraise SystemExit(1)"),  # right output, failing exit: 0
        answer("print(int(input() ** 2)"),  # syntax error
        "The answer is 4.",  # no code block
        "```python\nprint(int(input()) ** 2)\n```\n```python\nprint('last block wins')\n```",
    ]
    rewards = code_reward(completions, verification_info=[SQUARE] * len(completions))
    assert rewards == [1.0, 0.75, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]


def test_conversations_json_strings_and_extra_columns(code_reward):
    conversation = [{"role": "assistant", "content": answer("print(int(input()) ** 2)")}]
    rewards = code_reward(
        [conversation, conversation],
        verification_info=[json.dumps(SQUARE), SQUARE],
        prompts=["p", "p"],
        completion_ids=[[1], [2]],
        solution=["x", "y"],
    )
    assert rewards == [1.0, 1.0]
    assert code_reward.__name__ == "code"


def test_unscorable_problems_are_none_and_length_mismatch_is_an_error(code_reward):
    good = answer("print(int(input()) ** 2)")
    cpp = {"language": "cpp", "test_cases": SQUARE["test_cases"]}
    infos = ["{broken json", {"test_cases": []}, cpp, None, SQUARE]
    assert code_reward([good] * 5, verification_info=infos) == [None, None, None, None, 1.0]
    with pytest.raises(UserError, match="verification_info"):
        code_reward([good, good], verification_info=[SQUARE])
    with pytest.raises(UserError, match="Python"):
        make_code_reward(language="cpp")
    with pytest.raises(UserError, match="no option memory"):
        make_code_reward(sandbox={"memory": 1})
    with pytest.raises(UserError, match="isolation"):
        make_code_reward(isolation="docker")
    from_yaml = make_code_reward(sandbox={"timeout_s": 3, "memory_mb": 256})
    assert from_yaml([good], verification_info=[SQUARE]) == [1.0]


def test_empty_batch(code_reward):
    assert code_reward([], verification_info=[]) == []


# ----------------------------------------------------------------------------------------------------------
# hostile programs: each would print the expected output only if its attack worked
# ----------------------------------------------------------------------------------------------------------
def test_hostile_programs_score_zero_and_training_goes_on(code_reward, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("OPENR1_SANDBOX_TEST_SECRET", secret)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    outside = [f"/var/tmp/openr1-sandbox-test-{uuid.uuid4().hex}", f"{REPO}/openr1-sandbox-test-{uuid.uuid4().hex}"]

    def case(expected: str) -> dict:
        return {"language": "python", "test_cases": [{"input": "", "output": expected, "type": "stdin_stdout"}]}

    connect = "import socket\nsocket.create_connection({!r}, timeout=1)\nprint('connected')"
    hostile = {
        "socket": (connect.format(("127.0.0.1", port)), "connected"),
        "internet": (connect.format(("1.1.1.1", 53)), "connected"),
        "write": (f"for p in {outside!r}:\n    open(p, 'w').write('x')\nprint('written')", "written"),
        "secret": ("import os\nprint(os.environ.get('OPENR1_SANDBOX_TEST_SECRET'))", secret),
        "secret_proc": (
            "import os\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n        e = open(f'/proc/{p}/environ').read()\n    except OSError:\n        continue\n"
            f"    if '{secret}' in e:\n        print('{secret}')",
            secret,
        ),
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", ""),
        "allocate": ("x = bytearray(1 << 40)\nprint('allocated')", "allocated"),
        "allocate_slowly": ("a = []\nwhile True:\n    a.append(bytearray(10**7))", ""),
        "loop": ("while True:\n    pass", ""),
        "sleep": ("import time\ntime.sleep(1000)", ""),
        "gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "x"),
    }
    completions = [answer(code) for code, _ in hostile.values()] + [answer("print(input())")]
    infos = [case(expected) for _, expected in hostile.values()] + [
        {"test_cases": [{"input": "still fine\n", "output": "still fine"}]}
    ]
    start = time.monotonic()
    rewards = code_reward(completions, verification_info=infos)
    elapsed = time.monotonic() - start
    assert dict(zip([*hostile, "honest"], rewards)) == {**dict.fromkeys(hostile, 0.0), "honest": 1.0}
    assert elapsed < 15  # every run is bounded by the 2 s timeout; they run 8 at a time
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    for path in outside:
        assert not Path(path).exists()
    assert_host_fine()
    # and the reward still works afterwards
    assert code_reward([answer("print(int(input()) ** 2)")], verification_info=[SQUARE]) == [1.0]
