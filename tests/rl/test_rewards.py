"""Rewards: Open-R1's reward test cases on our implementations, the registry, and the errors a user can act on."""

import math
import sys
import time
import types

import pytest

from openr1_jax.data.embedded.task import solution_text
from openr1_jax.errors import UserError
from openr1_jax.rl.rewards import (
    REWARDS,
    call_reward,
    check_reward_columns,
    completion_text,
    get_reward,
    required_columns,
)

GOLD = r"\frac{63}{400}"
RIGHT = r"\boxed{\frac{63}{400}}"
WRONG = r"\boxed{\frac{64}{400}}"


def conv(text):
    return [{"role": "assistant", "content": text}]


def brevity(completions, **kwargs):
    """A user reward imported by dotted path in the tests below."""
    return [-len(completion_text(c)) / 100 for c in completions]


NOT_A_FUNCTION = 3


@pytest.fixture(scope="module")
def accuracy():
    return get_reward("accuracy", timeout_s=5.0)


# ----------------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, solution",
    [
        (RIGHT, GOLD),  # Open-R1's test_accuracy_reward_correct_answer
        (r"\boxed{\dfrac{63}{400}}", GOLD),
        (r"\boxed{0.1575}", GOLD),
        (RIGHT, f"${GOLD}$"),
        ("so the answer is \\boxed{0.5}", "\\frac{1}{2}"),
        ("Therefore, the final answer is: $\\boxed{\\frac{14}{3}}$. I hope it is correct", "\\frac{14}{3}"),
        ("The final answer is $5$", "5"),  # an anchor without a box
        (r"\boxed{x = 2}", "2"),
        (r"\boxed{2,3}", "3, 2"),
        (r"\boxed{\sqrt{2}}", "2^{1/2}"),
        (r"\boxed{1/2}", "0.5"),
        ("The final answer is $\\boxed{3}$", "Since x=3, we get \\boxed{3}"),  # a full worked solution as gold
        (solution_text(347, 285), "632"),  # the embedded task
    ],
)
def test_accuracy_equivalent_answers_score_1(accuracy, completion, solution):
    assert accuracy([conv(completion)], solution=[solution]) == [1.0]
    assert accuracy([completion], solution=[solution]) == [1.0]  # plain strings too


@pytest.mark.parametrize(
    "completion, solution",
    [
        (WRONG, GOLD),  # Open-R1's test_accuracy_reward_wrong_answer
        ("\\boxed{633}", "632"),
        ("the answer is 632", "632"),  # no anchor math-verify accepts: Open-R1 scores it 0
        ("", "632"),
        ("\\boxed{5} then \\boxed{6}", "6"),  # boxed="all": both boxes form the answer
    ],
)
def test_accuracy_wrong_or_missing_answers_score_0(accuracy, completion, solution):
    assert accuracy([conv(completion)], solution=[solution]) == [0.0]


@pytest.mark.parametrize(
    "completion, solution",
    [
        (r"\boxed{\frac12}", "0.5"),  # malformed operators are not repaired
        (r"\boxed{\frac{1}{2", "0.5"),  # an unclosed box
        (r"$\frac{$", "1"),
        (r"\boxed{}", "1"),
        (r"\boxed{\frac{1}{0}}", "1"),
        ("\\boxed{\\begin{matrix} 1 & 2 \\end{matrix}", "1"),
    ],
)
def test_accuracy_malformed_latex_scores_0(accuracy, completion, solution):
    assert accuracy([conv(completion)], solution=[solution]) == [0.0]


def test_accuracy_batch_and_unscorable_samples(accuracy):
    completions = [conv(RIGHT), conv(WRONG), conv(RIGHT), None, {"no": "content"}, conv(RIGHT), conv(RIGHT)]
    solutions = [GOLD, GOLD, GOLD, GOLD, GOLD, "$$", None]
    # Open-R1's test_multiple_completions, then: unreadable completions and golds that do not parse -> None
    assert accuracy(completions, solution=solutions) == [1.0, 0.0, 1.0, None, None, None, None]


def test_accuracy_is_bounded_in_time_off_the_main_thread():
    import threading

    fn = get_reward("accuracy", timeout_s=1.0)
    out = {}

    def run():
        start = time.perf_counter()
        out["rewards"] = fn(["\\boxed{10^{10^{10^{10}}}}", RIGHT], solution=["3", GOLD])
        out["elapsed"] = time.perf_counter() - start

    thread = threading.Thread(target=run)  # math-verify's signal.alarm would fail here; the workers do not
    thread.start()
    thread.join(60)
    assert out["rewards"] == [0.0, 1.0]  # the stuck check is killed and scores 0, as a math-verify timeout does
    assert out["elapsed"] < 20


def test_accuracy_options_are_checked():
    for bad in ({"timeout_s": 0}, {"num_workers": 0}, {"timeout_s": "soon"}):
        with pytest.raises(UserError, match="num_workers >= 1 and timeout_s > 0"):
            get_reward("accuracy", **bad)


def test_solution_column_missing_or_misaligned(accuracy):
    with pytest.raises(UserError, match="needs the 'solution' column"):
        accuracy([RIGHT])
    with pytest.raises(UserError, match="got 2 'solution' values for 1 completions"):
        accuracy([RIGHT], solution=[GOLD, GOLD])


# ----------------------------------------------------------------------------------------------------------
# format and tag_count
# ----------------------------------------------------------------------------------------------------------
def test_format_correct():
    fmt = get_reward("format")
    assert fmt([conv("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>")]) == [1.0]
    multiline = (
        "<think>\nI will count each distinct object in the image:\n1. Purple scooter\n2. Red bicycle\n"
        "3. Green motorcycle\n\nThere are 3 distinct objects in total.\n</think>\n<answer>\n3\n</answer>"
    )
    assert fmt([conv(multiline)]) == [1.0]
    # Open-R1 matches `$` under MULTILINE: a line may follow </answer>; the same holds here
    assert fmt(["<think>\na\n</think>\n<answer>\nb\n</answer>\ntrailing"]) == [1.0]


@pytest.mark.parametrize(
    "text",
    [
        "<think>Only thinking</think>",
        "<answer>Only answer</answer>",
        "No tags at all",
        "<think>Missing closing</think><answer>Missing closing",
        "<think>Wrong order</answer><answer>Wrong order</think>",
        "<think>Some reasoning</think><answer>The answer</answer>",  # the newlines are required
        "<think>\na\n</think>\n<answer>\nb\n</answer>trailing",
        " <think>\na\n</think>\n<answer>\nb\n</answer>",
        "<think>\n</think>\n<answer>\nb\n</answer>",  # needs a newline inside the think block
    ],
)
def test_format_incorrect(text):
    assert get_reward("format")([conv(text)]) == [0.0]


def test_format_boxed_is_the_embedded_task_format():
    fmt = get_reward("format", answer="boxed")
    good = solution_text(347, 285)
    assert fmt([good, good + "\n", "<think>\nx\n</think>\nSo the sum is \\boxed{ {6}32 }"]) == [1.0, 1.0, 1.0]
    bad = [
        "<think>\nx\n</think>\n632",  # no box
        "<think>\n\\boxed{632}\n</think>\nthe end",  # the box is inside the thinking
        "<think>\nx\n</think>\n\\boxed{632} and more",  # text after the box
        "<think>\nx\n</think>\n\\boxed{632",  # unclosed
        "<think>\nx\n</think>\n\\boxed{6}{32}",  # the last group is not the box
        "\\boxed{632}",
        "<think>\nx\n</think>\n<answer>\n632\n</answer>",
    ]
    assert fmt(bad) == [0.0] * len(bad)
    with pytest.raises(UserError, match="'tag' or 'boxed'"):
        get_reward("format", answer="xml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nSome reasoning\n</think>\n<answer>\nThe answer\n</answer>", 1.0),
        ("Some reasoning\n</think>\n<answer>\nThe answer\n</answer>", 0.75),
        ("<think>\nSome reasoning\n<answer>\nThe answer\n</answer>", 0.75),
        ("<think>\nSome reasoning\n</think>\nThe answer\n</answer>", 0.75),
        ("<think>\nSome reasoning\n</think>\n<answer>\nThe answer", 0.75),
        ("Some reasoning\nThe answer", 0.0),
        ("<think>\n<think>\nx\n</think>\n<answer>\ny\n</answer>", 0.75),  # a tag twice earns nothing
    ],
)
def test_tag_count(text, expected):
    assert get_reward("tag_count")([conv(text)]) == [expected]


# ----------------------------------------------------------------------------------------------------------
# reasoning_steps
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Step 1: First step\nStep 2: Second step\nStep 3: Third step", 1.0),
        ("First, we do this.\nSecond, we do that.\nFinally, we conclude.", 1.0),
        ("Step 1: Only step", 1 / 3),
        ("First, we do this.\nFinally, we conclude.", 2 / 3),
        ("Just plain text without any clear steps", 0.0),
        ("1. a\n- b\n* c\nNext, d", 1.0),
        ("intro\n2. only the start of the text counts for numbers", 0.0),  # Open-R1's `^` without MULTILINE
    ],
)
def test_reasoning_steps(text, expected):
    assert get_reward("reasoning_steps")([conv(text)]) == [pytest.approx(expected)]


# ----------------------------------------------------------------------------------------------------------
# length (Kimi 1.5) and cosine
# ----------------------------------------------------------------------------------------------------------
def test_length_same_length_responses_get_0():
    assert get_reward("length")([conv(RIGHT), conv(WRONG)], solution=[GOLD, GOLD]) == [0.0, 0.0]


def test_length_correct_incorrect_and_mixed():
    fn = get_reward("length")
    longer = "  " + "x" * 10
    right = fn([conv(RIGHT), conv(RIGHT + longer)], solution=[GOLD] * 2)
    assert right[0] == pytest.approx(0.5) and right[0] > right[1]
    wrong = fn([conv(WRONG), conv(WRONG + longer)], solution=[GOLD] * 2)
    assert wrong[0] <= 0 and wrong[1] <= 0 and wrong[0] > wrong[1]
    mixed = fn([conv(RIGHT), conv(RIGHT + longer), conv(WRONG), conv(WRONG + longer)], solution=[GOLD] * 4)
    assert mixed == pytest.approx([0.5, -0.5, 0.0, -0.5])  # lambda = 0.5 - (len - min) / (max - min)


def test_length_unparseable_gold_counts_as_correct():
    # Open-R1's "unparseable_latex" parses here (bare golds are read as LaTeX), so "$$" stands in for it
    rewards = get_reward("length")([conv(r"\boxed{answer}"), conv(r"\boxed{answer} " + "x" * 10)], solution=["$$"] * 2)
    assert rewards[0] == pytest.approx(0.5) and rewards[0] > rewards[1]


def test_length_is_normalised_within_each_prompt_group():
    fn = get_reward("length")
    completions = [RIGHT, RIGHT + "xx", RIGHT + "x" * 50, RIGHT + "x" * 100]
    grouped = fn(completions, solution=[GOLD] * 4, prompts=["p", "p", "q", "q"])
    assert grouped == pytest.approx([0.5, -0.5, 0.5, -0.5])
    whole = fn(completions, solution=[GOLD] * 4)  # no prompts: the batch is one group (Open-R1)
    assert whole[0] == pytest.approx(0.5) and whole[3] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "content, length, expected",
    [(RIGHT, 20, 0.943), (RIGHT, 80, 0.547), (WRONG, 20, -0.942), (WRONG, 80, -0.547)],
)
def test_cosine_scaled(content, length, expected):
    fn = get_reward(
        "cosine", min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0, max_len=100
    )
    padded = content + " " * (length - len(content))  # Open-R1 pads to the length (22 chars is the minimum)
    assert fn([conv(padded)], solution=[GOLD])[0] == pytest.approx(expected, abs=5e-3)


def test_cosine_formula_and_unparseable_gold():
    fn = get_reward("cosine", max_len=1000)
    text = RIGHT + " " * 478  # 500 characters: halfway, cos = 0
    assert fn([text], solution=[GOLD]) == [pytest.approx(0.75)]
    assert fn([text], solution=["0"]) == [pytest.approx(-0.75)]
    assert fn([text], solution=["$$"]) == [1.0]  # Open-R1 gives 1.0 to skip an unparseable gold
    with pytest.raises(UserError, match="max_len must be positive"):
        get_reward("cosine", max_len=0)


# ----------------------------------------------------------------------------------------------------------
# repetition_penalty
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ngram_size, max_penalty, text, expected",
    [
        (2, -1.0, "this is a test sentence", 0.0),
        (2, -1.0, "this this this this this", -0.75),
        (2, -1.0, "this is a this is a test", -1 / 3),
        (3, -0.5, "this is a test", 0.0),
        (3, -0.5, "test test test test", -0.25),
        (2, -1.0, "", 0.0),
        (3, -2.0, "this is a this is a test", -0.4),
        (3, -1.0, "word", 0.0),
        (3, -1.0, "two words", 0.0),
        (3, -1.0, "three different words", 0.0),
        (3, -1.0, "word word word word", -0.5),
        (3, -1.0, "one two one two", 0.0),
        (3, -0.5, "A B C A B", 0.0),
        (3, -1.0, "A B C A B C", -0.25),
        (3, -1.0, "A B C A B C E F G A B C A B C", -0.3846),
        (3, -1.0, "A B C D E F G H I J K L", 0.0),
    ],
)
def test_repetition_penalty(ngram_size, max_penalty, text, expected):
    fn = get_reward("repetition_penalty", ngram_size=ngram_size, max_penalty=max_penalty)
    assert fn([conv(text)]) == [pytest.approx(expected, abs=1e-4)]


def test_repetition_penalty_is_case_blind_and_checks_options():
    fn = get_reward("repetition_penalty", ngram_size=2)
    assert fn(["This is A Test", "this IS a test"])[0] == fn(["this is a test"])[0]
    with pytest.raises(UserError, match=r"max_penalty 1\.5 should not be positive"):
        get_reward("repetition_penalty", max_penalty=1.5)
    with pytest.raises(UserError, match="ngram_size must be >= 1"):
        get_reward("repetition_penalty", ngram_size=0)
    with pytest.raises(UserError, match="'en' or 'zh'"):
        get_reward("repetition_penalty", language="fr")


def test_repetition_penalty_zh_needs_jieba():
    try:
        import jieba  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install jieba"):
            get_reward("repetition_penalty", language="zh")
    else:
        fn = get_reward("repetition_penalty", language="zh", ngram_size=2)
        assert fn(["我爱北京天安门", "我爱我爱我爱我爱"])[1] < 0


# ----------------------------------------------------------------------------------------------------------
# soft_overlong_punishment (DAPO)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, expected", [(50, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (110, -1.0)])
def test_soft_overlong_punishment(length, expected):
    fn = get_reward("soft_overlong_punishment", max_completion_len=100, soft_punish_cache=20)
    assert fn(["x"], completion_ids=[[1] * length]) == [pytest.approx(expected)]


def test_soft_overlong_punishment_needs_ids_and_sane_options():
    fn = get_reward("soft_overlong_punishment", max_completion_len=100, soft_punish_cache=0)
    assert fn(["a", "b"], completion_ids=[[1] * 100, [1] * 101]) == [0.0, -1.0]
    with pytest.raises(UserError, match="'completion_ids'"):
        fn(["a"])
    with pytest.raises(UserError, match="soft_punish_cache"):
        get_reward("soft_overlong_punishment", max_completion_len=10, soft_punish_cache=20)


# ----------------------------------------------------------------------------------------------------------
# code rewards (the sandboxed scorer is openr1_jax.rl.code_reward's; a stand-in checks the delegation)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_code_reward(monkeypatch):
    calls = []

    def make_code_reward(language="python", timeout_s=10.0, num_parallel=2):
        calls.append(dict(language=language, timeout_s=timeout_s, num_parallel=num_parallel))

        def code(completions, verification_info, **_):
            return [info["score"] for info in verification_info]

        return code

    module = types.ModuleType("openr1_jax.rl.code_reward")
    module.make_code_reward = make_code_reward
    monkeypatch.setitem(sys.modules, "openr1_jax.rl.code_reward", module)
    return calls


def test_code_reward_delegates_to_the_sandbox_scorer(fake_code_reward):
    fn = get_reward("code", timeout_s=3.0)
    assert fake_code_reward == [dict(language="python", timeout_s=3.0, num_parallel=2)]
    assert fn.__name__ == "code"
    infos = [{"score": 1.0}, {"score": 0.995}, {"score": 0.5}, {"score": None}]
    assert fn(["a"] * 4, verification_info=infos) == [1.0, 0.995, 0.5, None]
    assert get_reward("binary_code")(["a"] * 4, verification_info=infos) == [1.0, 1.0, 0.0, None]
    with pytest.raises(UserError, match="no option memory"):
        get_reward("code", memory=1)


def test_code_format():
    fn = get_reward("code_format")
    good = "<think>\nLet's solve this\n</think>\n<answer>\n```python\ndef hello():\n    print('world')\n```\n</answer>"
    two = "<think>\n```python\nx = 1\n```\n</think>\n<answer>\n```python\ndef f():\n    return 42\n```\n</answer>"
    js = "<think>\nAnalysis\n</think>\n<answer>\n```javascript\nconsole.log('hello');\n```\n</answer>"
    bad = [
        "```python\ndef hello():\n    print('world')\n```",
        "<think>Some thinking</think><answer>Just plain text</answer>",
        "<think>Analysis</think><answer>```javascript\nconsole.log('hello');\n```</answer>",
        "<think>Analysis</think><answer>```\ndef hello(): pass\n```</answer>",
        "<answer>```python\ndef hello(): pass\n```</answer><think>Analysis</think>",
    ]
    assert fn([conv(good), conv(two), conv(js)] + [conv(b) for b in bad]) == [1.0, 1.0, 0.0] + [0.0] * 5
    assert get_reward("code_format", language="javascript")([conv(js)]) == [1.0]
    assert fn([conv(js), conv(js)], language=["javascript", "python"]) == [1.0, 0.0]  # a per-row column


# ----------------------------------------------------------------------------------------------------------
# the registry, user rewards, and errors before anything compiles
# ----------------------------------------------------------------------------------------------------------
def test_registry_has_open_r1_names_columns_and_help():
    expected = {
        "accuracy",
        "format",
        "tag_count",
        "reasoning_steps",
        "length",
        "cosine",
        "repetition_penalty",
        "soft_overlong_punishment",
        "code",
    }
    assert expected <= set(REWARDS)
    assert all(spec.help for spec in REWARDS.values())
    assert required_columns("accuracy") == ("solution",)
    assert required_columns("code") == ("verification_info",)
    assert required_columns("format") == ()
    for name in ("accuracy", "format", "tag_count", "reasoning_steps", "length", "cosine", "repetition_penalty"):
        assert get_reward(name).__name__ == name  # TRL keys the reward metrics by __name__


def test_unknown_reward_name_suggests_close_ones():
    with pytest.raises(UserError, match=r"unknown reward 'acuracy': did you mean 'accuracy'\?") as info:
        get_reward("acuracy")
    assert "repetition_penalty" in str(info.value)  # and lists what there is
    with pytest.raises(UserError, match="did you mean 'tag_count'"):
        required_columns("tag_counts")
    with pytest.raises(UserError, match="unknown reward 'zzz': available: accuracy"):
        get_reward("zzz")


def test_unknown_option_names_the_options():
    with pytest.raises(UserError, match="reward 'cosine' has no option max_length; its options are: min_value_wrong"):
        get_reward("cosine", max_length=10)
    with pytest.raises(UserError, match="reward 'format' has no option foo; its options are: answer"):
        get_reward("format", foo=1)


@pytest.mark.parametrize("path", ["tests.rl.test_rewards.brevity", "tests.rl.test_rewards:brevity"])
def test_user_reward_by_dotted_path(path):
    fn = get_reward(path)
    assert fn is brevity or fn.__name__ == "brevity"
    assert fn(["abc", conv("abcdef")]) == [-0.03, -0.06]
    assert required_columns(path) == ()


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_pkg.rewards.fn", "no module of that path can be imported"),
        ("tests.rl.test_rewards.no_such_fn", "has no attribute 'no_such_fn'"),
        ("tests.rl.test_rewards:NOT_A_FUNCTION", "is a int, not a function"),
        ("no_such_pkg:fn", "no module of that path"),
    ],
)
def test_user_reward_errors(path, message):
    with pytest.raises(UserError, match=message):
        get_reward(path)


def test_user_reward_takes_no_options():
    with pytest.raises(UserError, match="takes no options"):
        get_reward("tests.rl.test_rewards.brevity", scale=2)


def test_check_reward_columns_names_the_reward_and_the_column():
    columns = {"problem", "answer"}  # any iterable; the message lists them sorted
    check_reward_columns(["format", "tag_count", "tests.rl.test_rewards.brevity"], columns, "the dataset 'x'")
    with pytest.raises(
        UserError,
        match=r"reward 'accuracy' reads the column 'solution', which the dataset 'x' does not have "
        r"\(its columns: answer, problem\)",
    ):
        check_reward_columns(["format", "accuracy"], columns, "the dataset 'x'")
    with pytest.raises(UserError, match="'verification_info'"):
        check_reward_columns(["code"], columns, "the dataset 'x'")
    with pytest.raises(UserError, match="did you mean 'format'"):
        check_reward_columns(["formatt"], columns, "the dataset 'x'")


def test_call_reward_checks_what_a_reward_returns():
    assert call_reward("b", brevity, ["ab"]) == [-0.02]
    assert call_reward("n", lambda c, **_: [None, math.nan, True], ["a", "b", "c"]) == [None, None, 1.0]
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        call_reward("short", lambda c, **_: [1.0], ["a", "b"])
    with pytest.raises(UserError, match="returned 'x', not a float"):
        call_reward("str", lambda c, **_: ["x"], ["a"])
    with pytest.raises(UserError, match="returned float, not a list"):
        call_reward("scalar", lambda c, **_: 1.0, ["a"])


def test_completion_text_reads_every_shape():
    assert completion_text("a") == "a"
    assert completion_text(conv("b")) == "b"
    assert completion_text({"role": "assistant", "content": "c"}) == "c"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "d"}]}]) == "d"
    for odd in (None, 3, [], [None], {"content": None}, [{"content": 5}]):
        assert completion_text(odd) is None
