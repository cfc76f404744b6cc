"""Dataset rows -> prompts: raw columns, unique row ids, the prompt template and the chat messages.

The template is a Python format string over the row's columns; `{prompt}` is the value of
`dataset.prompt_column` whatever that column is called, so the default `"{prompt}"` works for any dataset.
Problems with the config (a missing column, a template field that names no column) are UserErrors before
anything runs; problems with one row (an empty prompt) become that row's error record.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.generate.config import DatasetSection, GenerateConfig

# Keys every output record has; dataset columns with these names are kept as `input_<name>`.
OUTPUT_FIELDS = (
    "id",
    "prompt",
    "generations",
    "finish_reasons",
    "prompt_tokens",
    "completion_tokens",
    "verdicts",
    "pass_rate",
    "kept",
    "error",
)
_READ_CHUNK = 1024  # rows converted from Arrow at a time


@dataclass
class PromptRow:
    index: int  # position in the dataset
    id: Any  # JSON value written to the output
    columns: dict[str, Any]  # the row's columns, colliding names renamed to input_<name>
    prompt: str | None  # the formatted user prompt (None when the row is unusable)
    messages: list[dict[str, str]] | None  # [system?, user] when use_chat_template
    reference: Any = None  # filters.reference_column's value
    error: str | None = None  # why the row cannot be sent


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different and any JSON value can be an id."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


class DatasetRows:
    """Random access to a dataset's raw rows, read in chunks (a hub dataset may not fit in memory as dicts)."""

    def __init__(self, spec: DatasetSection):
        from openr1_jax.data.config import DatasetSpec
        from openr1_jax.data.sources import open_table

        single = spec.path.startswith("embedded:") or os.path.isfile(os.path.expanduser(spec.path))
        self.description = f"dataset {spec.path!r}" + ("" if single else f" (split {spec.split!r})")
        self._data, columns = open_table(DatasetSpec(path=spec.path, split=spec.split, name=spec.name))
        self.columns: list[str] = list(columns)
        self._length = len(self._data)
        if self._length == 0:
            raise UserError(f"{self.description} has no rows")
        if spec.max_examples is not None:
            self._length = min(self._length, spec.max_examples)

    def __len__(self) -> int:
        return self._length

    def column(self, name: str) -> list[Any]:
        data = self._data
        if isinstance(data, list):
            return [row.get(name) for row in data[: self._length]]
        if hasattr(data, "to_pylist"):  # pyarrow.Table
            return data.column(name).slice(0, self._length).to_pylist()
        return list(data.select(range(self._length))[name])  # datasets.Dataset

    def rows(self, indices: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(index, row) for ascending `indices`, each a dict of every column."""
        data = self._data
        for start in range(0, len(indices), _READ_CHUNK):
            chunk = indices[start : start + _READ_CHUNK]
            if isinstance(data, list):
                yield from ((i, data[i]) for i in chunk)
                continue
            lo, hi = chunk[0], chunk[-1] + 1
            if hasattr(data, "to_pylist"):
                block = data.slice(lo, hi - lo).to_pylist()
            else:
                columns = data[lo:hi]
                block = [dict(zip(columns, values)) for values in zip(*columns.values())]
            yield from ((i, block[i - lo]) for i in chunk)


def template_fields(template: str) -> list[str]:
    """The column names a format string reads (`{a}`, `{a[0]}`, `{a.b}` -> "a"); UserError if it is malformed."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise UserError(
            f"prompt_template {template!r} is not a valid format string ({err}); write literal braces as {{{{ and }}}}"
        ) from None
    names = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        root = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise UserError(
                f"prompt_template has a positional field '{{{field_name}}}'; name a column like {{problem}} and write "
                "literal braces as {{ and }} (e.g. \\boxed{{}})"
            )
        names.append(root)
    return names


def check_columns(cfg: GenerateConfig, rows: DatasetRows) -> None:
    """Every column the config names exists in the dataset."""
    found = sorted(rows.columns)
    ds = cfg.dataset
    needed = [("dataset.prompt_column", ds.prompt_column)]
    if ds.id_column is not None:
        needed.append(("dataset.id_column", ds.id_column))
    if cfg.filters.math_verify:
        needed.append(("filters.reference_column", cfg.filters.reference_column))
    for what, column in needed:
        if column not in rows.columns:
            raise UserError(f"{what} {column!r} is not a column of {rows.description}; it has {found}")
    for name in template_fields(cfg.prompt_template):
        if name != "prompt" and name not in rows.columns:
            raise UserError(
                f"prompt_template names column {name!r}, which {rows.description} lacks; it has {found} "
                f"({{prompt}} stands for dataset.prompt_column)"
            )


def row_ids(cfg: GenerateConfig, rows: DatasetRows) -> list[Any]:
    """One id per row: the id column's values (checked unique and present) or the row index."""
    column = cfg.dataset.id_column
    if column is None:
        return list(range(len(rows)))
    ids = rows.column(column)
    seen: dict[str, int] = {}
    for i, value in enumerate(ids):
        if value is None:
            raise UserError(f"row {i} of {rows.description} has no {column!r} (dataset.id_column)")
        first = seen.setdefault(id_key(value), i)
        if first != i:
            raise UserError(
                f"dataset.id_column {column!r} has the value {value!r} in rows {first} and {i} of {rows.description}; "
                "ids must be unique (set id_column: null to use the row index)"
            )
    return ids


def renamed_columns(cfg: GenerateConfig, columns: list[str]) -> dict[str, str]:
    """Dataset column -> output key: unchanged, or `input_<name>` where it collides with an output field.
    The id column named `id` is dropped (the output's id holds its value)."""
    out = {}
    for name in columns:
        if name == "id" and cfg.dataset.id_column == "id":
            continue
        out[name] = f"input_{name}" if name in OUTPUT_FIELDS else name
    return out


def make_prompt_row(
    cfg: GenerateConfig, index: int, row_id: Any, row: dict[str, Any], names: dict[str, str]
) -> PromptRow:
    columns = {names[k]: v for k, v in row.items() if k in names}
    reference = row.get(cfg.filters.reference_column) if cfg.filters.math_verify else None
    out = PromptRow(index=index, id=row_id, columns=columns, prompt=None, messages=None, reference=reference)
    value = row.get(cfg.dataset.prompt_column)
    if not isinstance(value, str) or not value.strip():
        out.error = f"column {cfg.dataset.prompt_column!r} holds {_describe(value)}, not a prompt text"
        return out
    try:
        out.prompt = cfg.prompt_template.format_map({**row, "prompt": value})
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as err:
        out.error = f"prompt_template cannot be filled from this row: {type(err).__name__}: {err}"
        return out
    if cfg.use_chat_template:
        out.messages = [{"role": "user", "content": out.prompt}]
        if cfg.system_prompt is not None:
            out.messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "an empty string"
    return f"a {type(value).__name__}"
