"""Random-access row sources: JSONL, Parquet, `save_to_disk` folders, the hub, and the embedded task.

Every source yields rows with canonical keys, whatever the dataset calls its columns: either
`{"messages": [...]}` or `{"prompt": ..., "completion": ...}`. Chat templating (chat.py) only knows these keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from openr1_jax.data.config import DatasetSpec
from openr1_jax.errors import UserError

_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class RowSource(Sequence):
    """Rows of one dataset by index, renamed to canonical keys (grain's `RandomAccessDataSource` protocol)."""

    def __init__(self, data: Any, columns: dict[str, str], length: int, description: str):
        self._data = data  # list[dict], pyarrow.Table or datasets.Dataset
        self._columns = columns  # canonical key -> dataset column
        self._length = length
        self.description = description

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._length <= index < self._length:
            raise IndexError(f"row {index} out of range for {self.description} ({self._length} rows)")
        index %= self._length
        if isinstance(self._data, list):
            row = self._data[index]
        elif hasattr(self._data, "slice") and hasattr(self._data, "to_pylist"):  # pyarrow.Table
            row = self._data.slice(index, 1).to_pylist()[0]
        else:  # datasets.Dataset
            row = self._data[index]
        return {key: row[col] for key, col in self._columns.items()}

    def __repr__(self) -> str:
        return f"RowSource({self.description}, {self._length} rows, columns={self._columns})"


def load_source(spec: DatasetSpec) -> RowSource:
    """Opens the dataset of `spec` for random access; UserError if it cannot be read or lacks the columns."""
    data, columns_found = open_table(spec)
    length = len(data)
    if length == 0:
        raise UserError(f"dataset {spec.path!r} (split {spec.split!r}) has no rows.")
    columns = _pick_columns(spec, columns_found)
    if isinstance(data, list):
        for i, row in enumerate(data):
            missing = [c for c in columns.values() if c not in row]
            if missing:
                raise UserError(f"row {i} of dataset {spec.path!r} lacks column(s) {missing}; it has {sorted(row)}.")
    elif hasattr(data, "select_columns"):  # datasets.Dataset: read only what we use
        data = data.select_columns(sorted(set(columns.values())))
    elif hasattr(data, "select"):  # pyarrow.Table
        data = data.select(sorted(set(columns.values())))
    if spec.max_examples is not None:
        length = min(length, spec.max_examples)
    return RowSource(data, columns, length, description=f"{spec.path!r} split {spec.split!r}")


def _pick_columns(spec: DatasetSpec, found: Sequence[str]) -> dict[str, str]:
    if spec.messages_column in found:
        return {"messages": spec.messages_column}
    if spec.prompt_column in found and spec.completion_column in found:
        return {"prompt": spec.prompt_column, "completion": spec.completion_column}
    raise UserError(
        f"dataset {spec.path!r} needs a {spec.messages_column!r} column or both {spec.prompt_column!r} and "
        f"{spec.completion_column!r} columns; it has {sorted(found)}."
    )


def open_table(spec: DatasetSpec) -> tuple[Any, list[str]]:
    """A dataset's raw rows (a list, arrow table or datasets.Dataset, indexable by row) and its column names."""
    path = os.path.expanduser(spec.path)
    if path.startswith("embedded:"):
        return _open_embedded(path)
    if os.path.isdir(path):
        return _open_saved(path, spec.split)
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith(_JSONL_SUFFIXES):
            rows = read_jsonl(path)
            return rows, sorted({k for row in rows for k in row})
        if lower.endswith(_PARQUET_SUFFIXES):
            return _read_parquet(path)
        raise UserError(
            f"dataset file {path!r} has an unknown format; use .jsonl/.json (JSON lines) or .parquet, "
            "or a folder written by datasets' save_to_disk."
        )
    if path.startswith((".", "/", "~")) or path.lower().endswith(_JSONL_SUFFIXES + _PARQUET_SUFFIXES):
        raise UserError(f"dataset file {path!r} does not exist.")
    return _open_hub(spec)


def _open_embedded(path: str) -> tuple[list[dict], list[str]]:
    split = path.split(":", 1)[1]
    from openr1_jax.data import embedded  # lazy: generating the task is only needed when it is used

    rows = embedded.load_rows(split)
    return rows, sorted(rows[0]) if rows else []


def read_jsonl(path: str) -> list[dict]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if line_no == 1 and line.lstrip().startswith("["):
                    raise UserError(f"{path!r} is a JSON array; write one JSON object per line (JSONL).") from e
                raise UserError(f"line {line_no} of {path!r} is not valid JSON: {e.msg}.") from e
            if not isinstance(row, dict):
                raise UserError(f"line {line_no} of {path!r} is not a JSON object.")
            rows.append(row)
    return rows


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"cannot read Parquet file {path!r}: {e}.") from e
    return table, list(table.column_names)


def _open_saved(path: str, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise UserError(
            f"folder {path!r} is not a dataset written by datasets' save_to_disk (no dataset_info/state files)."
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {path!r} has no split {split!r}; it has {sorted(ds)}.")
        ds = ds[split]
    return ds, list(ds.column_names)


def _open_hub(spec: DatasetSpec):
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except Exception as e:  # offline, unknown repo, unknown config or split: all one message for the user
        raise UserError(f"cannot load dataset {spec.path!r} (config {spec.name!r}, split {spec.split!r}): {e}") from e
    if isinstance(ds, datasets.DatasetDict):  # split=None style answers
        ds = ds[spec.split]
    return ds, list(ds.column_names)
