"""Dataset rows -> prompts: the template, the `{prompt}` alias, ids, renamed columns, and input errors that
stop the job before anything is written."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openr1_jax.errors import UserError
from openr1_jax.generate.config import load_generate_config
from openr1_jax.generate.prompts import (
    DatasetRows,
    check_columns,
    make_prompt_row,
    renamed_columns,
    row_ids,
    template_fields,
)
from openr1_jax.generate.run import run_generate

ROWS = [
    {"problem": "What is 1 + 2?", "answer": "3", "source": "a"},
    {"problem": "What is 2 + 2?", "answer": "4", "source": "b"},
    {"problem": "", "answer": "0", "source": "c"},
]


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data, *overrides):
    return load_generate_config(
        "default",
        [f"dataset.path={data}", "dataset.id_column=null", f"output_path={tmp_path / 'out.jsonl'}", *overrides],
    )


def test_template_fills_columns_and_the_prompt_alias(tmp_path):
    data = _jsonl(tmp_path, ROWS)
    cfg = _cfg(tmp_path, data, "prompt_template='[{source}] {prompt} Answer in \\boxed{{}}.'", "system_prompt=Be brief")
    rows = DatasetRows(cfg.dataset)
    check_columns(cfg, rows)
    names = renamed_columns(cfg, rows.columns)
    got = [make_prompt_row(cfg, i, i, row, names) for i, row in rows.rows([0, 2])]
    assert got[0].prompt == "[a] What is 1 + 2? Answer in \\boxed{}."
    assert got[0].messages == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": got[0].prompt},
    ]
    assert got[0].columns == ROWS[0] and got[0].reference == "3"
    # An empty prompt is that row's error, not the job's.
    assert got[1].prompt is None and "holds an empty string" in got[1].error


def test_parquet_rows_and_id_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"uid": f"r{i}", "problem": f"p{i}"} for i in range(2500)]), path)
    cfg = _cfg(tmp_path, path, "dataset.id_column=uid", "dataset.max_examples=2100", "filters.math_verify=false")
    rows = DatasetRows(cfg.dataset)
    check_columns(cfg, rows)
    assert len(rows) == 2100 and row_ids(cfg, rows)[2099] == "r2099"
    got = list(rows.rows([3, 1500, 2099]))  # across read chunks
    assert [(i, r["problem"]) for i, r in got] == [(3, "p3"), (1500, "p1500"), (2099, "p2099")]


def test_columns_named_like_output_fields_are_kept_as_input_fields(tmp_path):
    data = _jsonl(tmp_path, [{"id": 7, "prompt": "hi", "kept": "x", "answer": "1"}])
    cfg = _cfg(tmp_path, data, "dataset.prompt_column=prompt")
    assert renamed_columns(cfg, ["id", "prompt", "kept", "answer"]) == {
        "id": "input_id",
        "prompt": "input_prompt",
        "kept": "input_kept",
        "answer": "answer",
    }
    cfg = _cfg(tmp_path, data, "dataset.id_column=id")
    assert "id" not in renamed_columns(cfg, ["id", "prompt"])  # the output's id is that column


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["dataset.prompt_column=question"],
            r"dataset.prompt_column 'question' is not a column of dataset '.*data"
            r"\.jsonl'; it has \['answer', 'problem', 'source'\]",
        ),
        (
            ["prompt_template='{problem} ({level})'"],
            r"prompt_template names column 'level', which dataset .* lacks; "
            r"it has \['answer', 'problem', 'source'\]",
        ),
        (["prompt_template='put it in \\boxed{}: {problem}'"], r"positional field '\{\}'.*\\boxed\{\{\}\}"),
        (["prompt_template='{problem'"], "not a valid format string"),
        (["filters.reference_column=solution"], "filters.reference_column 'solution' is not a column"),
        (["dataset.id_column=source", "dataset.path=DUP"], "has the value 'a' in rows 0 and 1"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, overrides, message):
    data = _jsonl(tmp_path, ROWS)
    dup = _jsonl(tmp_path, [ROWS[0], ROWS[0]], "dup.jsonl")
    overrides = [o.replace("DUP", str(dup)) for o in overrides]
    cfg = _cfg(tmp_path, data, *overrides)
    with pytest.raises(UserError, match=message):
        run_generate(cfg)
    assert not (tmp_path / "out.jsonl").exists()


def test_template_fields():
    assert template_fields("{a} {b[0]} {c.real} {{literal}}") == ["a", "b", "c"]


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    rows = [{"q": f"problem {i}", "n": i} for i in range(5)]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(tmp_path, tmp_path / "ds", "dataset.split=test", "dataset.prompt_column=q", "dataset.id_column=n",
               "filters.math_verify=false")  # fmt: skip
    data = DatasetRows(cfg.dataset)
    check_columns(cfg, data)
    assert row_ids(cfg, data) == [0, 1, 2, 3, 4]
    assert list(data.rows([1, 4])) == [(1, rows[1]), (4, rows[4])]
    with pytest.raises(UserError, match=r"has no split 'train'; it has \['test'\]"):
        DatasetRows(_cfg(tmp_path, tmp_path / "ds").dataset)
