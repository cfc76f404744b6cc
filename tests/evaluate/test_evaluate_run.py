"""`run_evaluate` end to end on a tiny random model with the real engine, the recipes, and bad input."""

import json

import pytest

from openr1_jax.errors import UserError
from openr1_jax.evaluate.benchmarks import (
    BENCHMARK_DIR,
    CHOICE_TEMPLATE,
    MATH_TEMPLATE,
    SHIPPED,
    BenchmarkConfig,
    Problem,
    load_problems,
    render_prompt,
    shipped_text,
)
from openr1_jax.evaluate.config import EvaluateConfig, list_recipes, load_evaluate_config
from openr1_jax.evaluate.run import run_evaluate
from openr1_jax.evaluate.scoring import score_math


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny DeepSeek-V3-shaped model saved with the embedded tokenizer (what `from_pretrained` reads)."""
    from transformers import AutoTokenizer

    from openr1_jax.convert.checkpoint import save_model
    from openr1_jax.data.embedded import TOKENIZER_DIR
    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_preset

    path = tmp_path_factory.mktemp("evaluate") / "model"
    model = build_model(load_preset("tiny-moe").replace(vocab_size=512), seed=0)
    save_model(model, path, tokenizer=AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))
    return path


def _tiny(model_dir, tmp_path, *extra):
    return [
        f"model.name_or_path={model_dir}",
        "model.tokenizer=null",
        "benchmark.max_examples=3",
        "sampling.max_new_tokens=8",
        "sampling.num_samples=2",
        "sampling.pass_k=[1, 2]",
        f"output_path={tmp_path / 'report.json'}",
        "progress=false",
        *extra,
    ]


def test_run_evaluate_math_end_to_end(model_dir, tmp_path):
    system = "prompt.system_prompt=Add carefully."
    cfg = load_evaluate_config("embedded", _tiny(model_dir, tmp_path, system))
    summary = run_evaluate(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"] == summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert summary["num_problems"] == 3 and summary["num_samples"] == 2 and summary["num_completions"] == 6
    assert summary["model"] == str(model_dir) and summary["task"] == "math"
    assert summary["sampling"] == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": -1,
        "min_p": 0.0,
        "max_new_tokens": 8,
        "num_samples": 2,
        "seed": 0,
    }
    assert set(summary["pass@k"]) == {"pass@1", "pass@2"}
    assert summary["prompt"]["template"] == "{problem}"
    assert sum(summary["finish_reasons"].values()) == 6
    problems = report["problems"]
    assert [p["id"] for p in problems] == ["add-77-33", "add-88-24", "add-89-67"]
    for p in problems:
        assert p["prompt"].count(p["problem"]) == 1  # the bare problem inside the chat template
        assert p["prompt"].index("Add carefully.") < p["prompt"].index(p["problem"])
        assert len(p["completions"]) == len(p["correct"]) == len(p["completion_tokens"]) == 2
        assert all(1 <= t <= 8 for t in p["completion_tokens"])
        assert set(p["finish_reasons"]) <= {"stop", "length"}
        # The flags written are what math-verify says about the completions written.
        assert p["correct"] == [score_math(c, p["answer"]).correct for c in p["completions"]]
    assert summary["pass@1"] == pytest.approx(sum(sum(p["correct"]) for p in problems) / 6)

    # Same seed, fewer problems: each problem's samples depend on its id alone, not on the batch it rode in.
    fewer = load_evaluate_config("embedded", _tiny(model_dir, tmp_path, system, "benchmark.max_examples=2"))
    run_evaluate(fewer)
    again = json.loads((tmp_path / "report.json").read_text())["problems"]
    assert [p["completions"] for p in again] == [p["completions"] for p in problems[:2]]


def test_run_evaluate_multiple_choice_end_to_end(model_dir, tmp_path):
    cfg = load_evaluate_config("embedded-choice", _tiny(model_dir, tmp_path, "prompt.use_chat_template=false"))
    summary = run_evaluate(cfg)
    problems = json.loads((tmp_path / "report.json").read_text())["problems"]
    assert summary["task"] == "multiple_choice" and summary["num_completions"] == 6
    for p in problems:
        assert p["answer"] in "ABCD" and len(p["choices"]) == 4
        assert p["prompt"].startswith("Answer the following multiple choice question.")  # raw text, no template
        assert p["prompt"].endswith("\n\n" + "\n".join(f"{x}) {c}" for x, c in zip("ABCD", p["choices"])))
        assert all(e is None or e in "ABCD" for e in p["extracted"])


def test_max_new_tokens_is_cut_to_the_room_after_each_prompt(model_dir):
    from openr1_jax.evaluate.run import _prompt_text, _sampling_params
    from openr1_jax.generate import Engine

    cfg = load_evaluate_config("embedded", ["sampling.max_new_tokens=8"])
    problems = [Problem("a", "What is 1 + 2?", "3"), Problem("b", "What is 10 + 20 + 30 + 40 + 50?", "150")]
    engine = Engine.from_pretrained(model_dir, max_seq_len=64)
    prompts = [_prompt_text(engine, cfg, p) for p in problems]
    lengths = [len(engine.encode(p)) for p in prompts]
    assert lengths[1] > lengths[0]
    short = Engine.from_pretrained(model_dir, max_seq_len=lengths[1] + 3)
    params = _sampling_params(short, cfg, problems, prompts)
    assert [p.max_new_tokens for p in params] == [min(8, lengths[1] + 3 - lengths[0]), 3]
    assert params[0].seed != params[1].seed and params[0].n == 4  # the embedded recipe samples 4
    tiny = Engine.from_pretrained(model_dir, max_seq_len=lengths[0])
    with pytest.raises(UserError, match=r"problem 0 \('a'\) does not fit"):
        _sampling_params(tiny, cfg, problems, prompts)


# ----------------------------------------------------------------------------------------------------------
# Benchmarks and prompts (no model)
# ----------------------------------------------------------------------------------------------------------
def test_shipped_benchmarks_equal_their_generator():
    for name in SHIPPED:
        assert (BENCHMARK_DIR / f"{name}.jsonl").read_text(encoding="utf-8") == shipped_text(name), (
            f"regenerate with python -m openr1_jax.evaluate.benchmarks ({name})"
        )


def test_shipped_choice_rows_hold_the_right_answer_once():
    problems, _ = load_problems(
        BenchmarkConfig(path="embedded_choice", task="multiple_choice", problem_column="Question")
    )
    assert len(problems) == 32
    letters = [p.answer for p in problems]
    assert len(set(letters)) > 1  # the correct option moves around
    for p in problems:
        a, b = (int(x) for x in p.problem.removeprefix("What is ").removesuffix("?").split(" + "))
        assert p.choices["ABCD".index(p.answer)] == str(a + b)
        assert len(set(p.choices)) == 4
    again, _ = load_problems(BenchmarkConfig(path="embedded_choice", task="multiple_choice", problem_column="Question"))
    assert again == problems  # the shuffle is seeded
    other, _ = load_problems(
        BenchmarkConfig(path="embedded_choice", task="multiple_choice", problem_column="Question", shuffle_seed=1)
    )
    assert [p.answer for p in other] != letters


def test_choices_column_with_letter_index_or_text(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"question": "Q1", "options": ["x", "y", "z"], "label": "C"},
        {"question": "Q2", "options": ["x", "y"], "label": 0},
        {"question": "Q3", "options": ["x", "y"], "label": "y"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = BenchmarkConfig(
        path=str(path),
        task="multiple_choice",
        problem_column="question",
        choices_column="options",
        answer_column="label",
    )
    problems, _ = load_problems(cfg)
    assert [(p.answer, p.choices) for p in problems] == [("C", ("x", "y", "z")), ("A", ("x", "y")), ("B", ("x", "y"))]
    assert [p.id for p in problems] == ["0", "1", "2"]


def test_templates_are_lightevals_and_fill_in_one_pass():
    assert MATH_TEMPLATE.startswith("Solve the following math problem efficiently and clearly.  The last line")
    assert "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct'" in MATH_TEMPLATE
    math = render_prompt(Problem("0", "What is {choices}?", "1"), MATH_TEMPLATE)
    assert math.endswith("Think step by step before answering.\n\nWhat is {choices}?")  # inserted text stays as is
    mc = render_prompt(Problem("0", "Which?", "B", ("p", "q", "r", "s")), CHOICE_TEMPLATE)
    assert mc == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
        "answering.\n\nWhich?\n\nA) p\nB) q\nC) r\nD) s"
    )


def test_every_evaluate_recipe_parses():
    assert {"embedded", "embedded-choice", "math-500", "aime24", "gpqa-diamond"} <= set(list_recipes())
    for name in list_recipes():
        cfg = load_evaluate_config(name)
        assert isinstance(cfg, EvaluateConfig)
        assert max(cfg.sampling.pass_k) <= cfg.sampling.num_samples
    default = load_evaluate_config(None)
    assert (default.sampling.temperature, default.sampling.top_p) == (0.6, 0.95)
    assert default.template == MATH_TEMPLATE and default.report_path == "runs/evaluate/embedded_math.json"


# ----------------------------------------------------------------------------------------------------------
# Bad input: one sentence naming the problem, before any model is loaded, nothing written
# ----------------------------------------------------------------------------------------------------------
def test_missing_problem_column_names_column_and_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n')
    cfg = load_evaluate_config("embedded", [f"benchmark.path={path}", f"output_path={tmp_path / 'r.json'}"])
    with pytest.raises(UserError, match=rf"benchmark '{path}' has no column 'problem' \(benchmark.problem_column\)"):
        run_evaluate(cfg)
    assert not (tmp_path / "r.json").exists()


def test_unknown_benchmark_name():
    cfg = load_evaluate_config("embedded", ["benchmark.path=embeded_math"])
    with pytest.raises(UserError, match=r"unknown benchmark 'embeded_math' \(did you mean 'embedded_math'\?\)"):
        run_evaluate(cfg)
    with pytest.raises(UserError, match=r"unknown benchmark '\./nope\.jsonl'"):
        run_evaluate(load_evaluate_config("embedded", ["benchmark.path=./nope.jsonl"]))


def test_k_larger_than_n():
    with pytest.raises(UserError, match=r"sampling\.pass_k holds 8 but sampling\.num_samples is 4"):
        load_evaluate_config("embedded", ["sampling.pass_k=[1, 8]"])


def test_other_bad_configs(tmp_path):
    with pytest.raises(UserError, match=r"must contain \{problem\}"):
        load_evaluate_config("embedded", ["prompt.template=hello"])
    with pytest.raises(UserError, match=r"must contain \{choices\}"):
        load_evaluate_config("embedded-choice", ['prompt.template="{problem}"'])
    with pytest.raises(UserError, match=r"sampling\.temprature"):
        load_evaluate_config("embedded", ["sampling.temprature=1"])
    cfg = load_evaluate_config(
        "embedded", [f"model.name_or_path={tmp_path / 'none'}", f"output_path={tmp_path}/r.json"]
    )
    with pytest.raises(UserError, match="does not exist"):
        run_evaluate(cfg)
