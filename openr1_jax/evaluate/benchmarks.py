"""Benchmarks: where the rows are, which columns hold what, and the prompt each problem becomes.

A benchmark is a shipped name (`embedded_math`, `embedded_choice`: the bundled addition task, MATH-500 and GPQA
shaped) or the user's JSONL/Parquet file, `save_to_disk` folder or hub dataset (ORG/NAME). Two task types:

- math: a problem column and a gold answer column (MATH-500: `problem`/`answer`; AIME 2024: `problem`/`answer`).
- multiple_choice: a question plus either a list column of options with the gold as a letter, 0-based index or
  option text, or GPQA's `Correct Answer` / `Incorrect Answer 1..3` columns; then, as lighteval's GPQA task
  does, the correct answer is inserted among the incorrect ones at a random position, drawn here from
  `shuffle_seed` and the row number so every run asks the same question.

Prompt templates are lighteval's (what Open-R1 evaluates with); placeholders are `{problem}`, and for multiple
choice `{choices}` ("A) ...\\nB) ...") and `{letters}` ("ABCD"). Anything else in braces, such as
`$\\boxed{ANSWER}$`, is left alone.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openr1_jax.errors import UserError

BENCHMARK_DIR = Path(__file__).resolve().parents[1] / "data" / "embedded" / "benchmarks"

# lighteval's MATH-500 / AIME query (default_prompts.math_500; the double space after "clearly." is theirs).
MATH_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.\n\n{problem}"
)
# lighteval's GPQA query (gpqa_instruct, from simple-evals), with the options and their letters as placeholders.
CHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of {letters}. Think step by step before "
    "answering.\n\n{problem}\n\n{choices}"
)
DEFAULT_TEMPLATES = {"math": MATH_TEMPLATE, "multiple_choice": CHOICE_TEMPLATE}
GPQA_INCORRECT = ["Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".pq")
_PLACEHOLDER = re.compile(r"\{(problem|choices|letters)\}")


@dataclass(frozen=True)
class BenchmarkConfig:
    path: str = field(
        default="embedded_math",
        metadata={
            "help": "shipped benchmark (embedded_math, embedded_choice), or a JSONL/Parquet file, save_to_disk "
            "folder or hub dataset ORG/NAME"
        },
    )
    task: Literal["math", "multiple_choice"] = field(
        default="math", metadata={"help": "math (math-verify on the answer) or multiple_choice (the letter)"}
    )
    split: str = field(default="test", metadata={"help": "split of a save_to_disk DatasetDict or hub dataset"})
    subset: str | None = field(default=None, metadata={"help": "hub dataset config name (e.g. gpqa_diamond)"})
    problem_column: str = field(default="problem", metadata={"help": "column with the question"})
    answer_column: str = field(
        default="answer",
        metadata={"help": "math: the gold answer; multiple choice with choices_column: gold letter, index or text"},
    )
    id_column: str | None = field(
        default=None,
        metadata={"help": "column with a problem id (default: unique_id, id or Record ID if present, else the row)"},
    )
    choices_column: str | None = field(
        default=None, metadata={"help": "multiple choice: column with the list of options (else GPQA columns)"}
    )
    correct_column: str = field(default="Correct Answer", metadata={"help": "GPQA-style: the correct option"})
    incorrect_columns: list[str] = field(
        default_factory=lambda: list(GPQA_INCORRECT), metadata={"help": "GPQA-style: the incorrect options"}
    )
    shuffle_seed: int = field(default=0, metadata={"help": "GPQA-style: seed of the correct option's position"})
    max_examples: int | None = field(default=None, metadata={"help": "keep only the first N problems"})

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("benchmark.path must not be empty")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"benchmark.max_examples must be >= 1, not {self.max_examples}")
        if self.task == "multiple_choice" and self.choices_column is None and not self.incorrect_columns:
            raise UserError("benchmark.incorrect_columns must list at least one column (or set choices_column)")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str  # the question as the data gives it
    answer: str  # math: the gold answer; multiple choice: the gold letter
    choices: tuple[str, ...] = ()  # multiple choice: the options in the order shown


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def shipped_benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.jsonl"))


def resolve_path(name_or_path: str) -> str:
    """A shipped name -> its file; an existing path or a hub ORG/NAME as given; anything else is a UserError."""
    shipped = BENCHMARK_DIR / f"{name_or_path}.jsonl"
    if "/" not in name_or_path and shipped.is_file():
        return str(shipped)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if "/" not in name_or_path or name_or_path.startswith((".", "/", "~")) or path.suffix in _FILE_SUFFIXES:
        names = shipped_benchmarks()
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"unknown benchmark '{name_or_path}'{hint}: it is not a shipped benchmark ({', '.join(names)}) nor an "
            "existing file or folder"
        )
    return name_or_path  # ORG/NAME on the hub


def read_rows(cfg: BenchmarkConfig) -> tuple[list[dict[str, Any]], str]:
    """The benchmark's rows (at most max_examples) and the resolved source, for messages and the report."""
    from openr1_jax.data.config import DatasetSpec
    from openr1_jax.data.sources import open_table  # the data sources' reader: JSONL, Parquet, save_to_disk, hub

    source = resolve_path(cfg.path)
    data, _ = open_table(DatasetSpec(path=source, split=cfg.split, name=cfg.subset))
    n = len(data) if cfg.max_examples is None else min(len(data), cfg.max_examples)
    if isinstance(data, list):
        rows = data[:n]
    elif hasattr(data, "to_pylist"):  # pyarrow.Table
        rows = data.slice(0, n).to_pylist()
    else:  # datasets.Dataset
        rows = data.select(range(n)).to_list()
    if not rows:
        raise UserError(f"benchmark '{source}' has no rows")
    return rows, source


def load_problems(cfg: BenchmarkConfig) -> tuple[list[Problem], str]:
    rows, source = read_rows(cfg)
    if cfg.task == "math":
        needed = [("problem_column", cfg.problem_column), ("answer_column", cfg.answer_column)]
    elif cfg.choices_column is not None:
        needed = [
            ("problem_column", cfg.problem_column),
            ("choices_column", cfg.choices_column),
            ("answer_column", cfg.answer_column),
        ]
    else:
        needed = [("problem_column", cfg.problem_column), ("correct_column", cfg.correct_column)]
        needed += [(f"incorrect_columns.{i}", c) for i, c in enumerate(cfg.incorrect_columns)]
    if cfg.id_column is not None:
        needed.append(("id_column", cfg.id_column))
    for i, row in enumerate(rows):
        for option, column in needed:
            if column not in row:
                raise UserError(
                    f"benchmark '{source}' has no column '{column}' (benchmark.{option})"
                    + (f" in row {i}" if i else "")
                    + f"; it has {', '.join(sorted(map(str, row)))}"
                )
    id_column = cfg.id_column or next((c for c in ("unique_id", "id", "Record ID") if c in rows[0]), None)
    problems = []
    for i, row in enumerate(rows):
        pid = str(row[id_column]) if id_column is not None and id_column in row else str(i)
        question = _text(row[cfg.problem_column], source, i, cfg.problem_column)
        if cfg.task == "math":
            answer = row[cfg.answer_column]
            if answer is None or str(answer).strip() == "":
                raise UserError(f"row {i} of benchmark '{source}' has an empty answer ('{cfg.answer_column}')")
            problems.append(Problem(pid, question, str(answer).strip()))
        elif cfg.choices_column is not None:
            choices, letter = _listed_choices(row, cfg, source, i)
            problems.append(Problem(pid, question, letter, choices))
        else:
            choices, letter = _gpqa_choices(row, cfg, source, i)
            problems.append(Problem(pid, question, letter, choices))
    return problems, source


def _text(value: Any, source: str, row: int, column: str) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool) or str(value).strip() == "":
        raise UserError(f"row {row} of benchmark '{source}' has no text in column '{column}'")
    return str(value)


def _listed_choices(row: dict, cfg: BenchmarkConfig, source: str, i: int) -> tuple[tuple[str, ...], str]:
    options = row[cfg.choices_column]
    if not isinstance(options, list | tuple) or not 2 <= len(options) <= len(LETTERS):
        raise UserError(
            f"row {i} of benchmark '{source}': column '{cfg.choices_column}' must be a list of 2 to 26 options"
        )
    choices = tuple(_text(o, source, i, cfg.choices_column).strip() for o in options)
    gold = row[cfg.answer_column]
    letters = LETTERS[: len(choices)]
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices):
        return choices, letters[gold]
    if isinstance(gold, str) and gold.strip().upper() in letters and len(gold.strip()) == 1:
        return choices, gold.strip().upper()
    if isinstance(gold, str) and gold.strip() in choices:
        return choices, letters[choices.index(gold.strip())]
    raise UserError(
        f"row {i} of benchmark '{source}': the answer {gold!r} ('{cfg.answer_column}') is none of the letters "
        f"{letters}, an index below {len(choices)}, or one of the options"
    )


def _gpqa_choices(row: dict, cfg: BenchmarkConfig, source: str, i: int) -> tuple[tuple[str, ...], str]:
    incorrect = [_text(row[c], source, i, c).strip() for c in cfg.incorrect_columns]
    correct = _text(row[cfg.correct_column], source, i, cfg.correct_column).strip()
    gold = random.Random(f"{cfg.shuffle_seed}:{i}").randint(0, len(incorrect))  # lighteval: randint(0, 3)
    choices = [*incorrect[:gold], correct, *incorrect[gold:]]
    return tuple(choices), LETTERS[gold]


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------
def check_template(template: str, task: str) -> None:
    if "{problem}" not in template:
        raise UserError("prompt.template must contain {problem}, where the question goes")
    if task == "multiple_choice" and "{choices}" not in template:
        raise UserError("prompt.template of a multiple_choice benchmark must contain {choices}, where the options go")


def render_prompt(problem: Problem, template: str) -> str:
    """The user message: `template` with its placeholders filled in one pass (inserted text is never re-read)."""
    letters = LETTERS[: len(problem.choices)]
    values = {
        "problem": problem.problem,
        "choices": "\n".join(f"{letter}) {text}" for letter, text in zip(letters, problem.choices)),
        "letters": letters,
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def problem_seed(seed: int, problem_id: str) -> int:
    """A sampling seed per problem from the run's seed and the problem's id: the same samples whatever the order,
    batch or max_examples."""
    digest = hashlib.blake2b(f"{seed}:{problem_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# ----------------------------------------------------------------------------------------------------------
# The shipped benchmarks of the embedded task
# ----------------------------------------------------------------------------------------------------------
SHIPPED_ROWS = 32


def embedded_math_rows(num: int = SHIPPED_ROWS) -> list[dict[str, str]]:
    """MATH-500-shaped rows (`problem`, `answer`, `unique_id`) of the embedded task's held-out split."""
    from openr1_jax.data.embedded import load_rows

    return [{"problem": r["problem"], "answer": r["answer"], "unique_id": r["id"]} for r in load_rows("test", num)]


def _distractors(a: int, b: int) -> list[int]:
    """Three wrong sums a learner of the column method could write: the carries forgotten, off by ten, by one."""
    total = a + b
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width), str(b).zfill(width)
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(xs, ys)))
    wrong = []
    for candidate in (no_carry, total + 10, total - 10, total + 1, total - 1, total + 11):
        if candidate != total and candidate > 0 and candidate not in wrong:
            wrong.append(candidate)
    return wrong[:3]


def embedded_choice_rows(num: int = SHIPPED_ROWS) -> list[dict[str, str]]:
    """GPQA-shaped rows (`Question`, `Correct Answer`, `Incorrect Answer 1..3`, `Record ID`) of the same problems."""
    from openr1_jax.data.embedded import load_rows

    rows = []
    for r in load_rows("test", num):
        a, b = (int(x) for x in r["id"].removeprefix("add-").split("-"))
        wrong = _distractors(a, b)
        row = {"Question": r["problem"], "Correct Answer": r["answer"]}
        row |= {name: str(w) for name, w in zip(GPQA_INCORRECT, wrong, strict=True)}
        row["Record ID"] = r["id"]
        rows.append(row)
    return rows


SHIPPED = {"embedded_math": embedded_math_rows, "embedded_choice": embedded_choice_rows}


def shipped_text(name: str) -> str:
    """The exact contents of shipped benchmark `name` (JSON lines)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in SHIPPED[name]())


def write_shipped(out_dir: Path = BENCHMARK_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SHIPPED:
        path = out_dir / f"{name}.jsonl"
        path.write_text(shipped_text(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m openr1_jax.evaluate.benchmarks: regenerate the shipped files
    for p in write_shipped():
        print(f"wrote {p}")
