"""Row sources: every format gives the same canonical rows; bad input is one clear UserError."""

from __future__ import annotations

import json

import pytest

from openr1_jax.data.config import DataConfig, DatasetSpec
from openr1_jax.data.sources import load_source
from openr1_jax.errors import UserError

ROWS = [
    {
        "id": i,
        "conversation": [
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"\\boxed{{{2 * i}}}"},
        ],
        "question": f"What is {i} + {i}?",
        "answer": f"\\boxed{{{2 * i}}}",
    }
    for i in range(7)
]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _expected(column: str = "conversation"):
    return [{"messages": r[column]} for r in ROWS]


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    src = load_source(DatasetSpec(path=path, messages_column="conversation"))
    assert len(src) == 7 and list(src) == _expected()
    assert src[-1] == _expected()[-1]
    with pytest.raises(IndexError):
        src[7]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    src = load_source(DatasetSpec(path=path, messages_column="conversation"))
    assert list(src) == _expected()


def test_save_to_disk_folder_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    src = load_source(DatasetSpec(path=str(tmp_path / "single"), messages_column="conversation"))
    assert list(src) == _expected()

    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    src = load_source(DatasetSpec(path=str(tmp_path / "dict"), split="test", messages_column="conversation"))
    assert list(src) == _expected()[:2]
    with pytest.raises(UserError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        load_source(DatasetSpec(path=str(tmp_path / "dict"), split="validation"))


def test_prompt_completion_columns_and_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    spec = DatasetSpec(path=path, prompt_column="question", completion_column="answer", max_examples=3)
    src = load_source(spec)
    assert list(src) == [{"prompt": r["question"], "completion": r["answer"]} for r in ROWS[:3]]


def test_missing_column_names_the_columns_found(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match=r"needs a 'messages' column.*it has \['answer', 'conversation', 'id'"):
        load_source(DatasetSpec(path=path))
    partial = [*ROWS[:3], {"id": 3}]
    path = write_jsonl(tmp_path / "partial.jsonl", partial)
    with pytest.raises(UserError, match=r"row 3 of dataset .* lacks column\(s\) \['conversation'\]"):
        load_source(DatasetSpec(path=path, messages_column="conversation"))


def test_empty_missing_and_unknown_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        load_source(DatasetSpec(path=str(empty)))
    with pytest.raises(UserError, match="does not exist"):
        load_source(DatasetSpec(path=str(tmp_path / "nope.jsonl")))
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserError, match="unknown format"):
        load_source(DatasetSpec(path=str(csv)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{oops\n')
    with pytest.raises(UserError, match=r"line 2 of .* is not valid JSON"):
        load_source(DatasetSpec(path=str(bad)))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not a dataset written by datasets' save_to_disk"):
        load_source(DatasetSpec(path=str(tmp_path / "folder")))


def test_config_validation():
    with pytest.raises(UserError, match="weight"):
        DatasetSpec(path="x.jsonl", weight=0)
    with pytest.raises(UserError, match="seq_len"):
        DataConfig(seq_len=1)
    with pytest.raises(UserError, match="overlong"):
        DataConfig(overlong="wrap")
    with pytest.raises(UserError, match="at least one dataset"):
        DataConfig(datasets=[])
