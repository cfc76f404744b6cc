"""Decontamination: flag (or remove) training rows whose problem shares a word 8-gram with a benchmark problem.

The method of Open-R1's `scripts/decontaminate.py` (from s1): lower-case the text and collapse whitespace,
split it into words, and call a training row contaminated by a benchmark when any run of `ngram_size`
consecutive words of its problem also occurs in one of the benchmark's problems. One boolean column
`contaminated_<benchmark>` is added per benchmark; `mode: remove` drops the flagged rows and those columns
instead (Open-R1's `--cleanup`). Texts shorter than `ngram_size` words have no n-grams and are never flagged.

    openr1-jax decontaminate dataset=data/train.jsonl benchmarks.0.path=data/math500.jsonl mode=remove
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openr1_jax.errors import UserError
from openr1_jax.evaluate.benchmarks import BenchmarkConfig, read_rows
from openr1_jax.fileio import atomic_file
from openr1_jax.models.presets import config_dir
from openr1_jax.structured import load_config
from openr1_jax.train.config import resolve_recipe

RECIPE_DIR = config_dir("decontaminate")


@dataclass(frozen=True)
class BenchmarkRef:
    path: str = field(
        default="embedded_math",
        metadata={"help": "shipped benchmark name, JSONL/Parquet file, save_to_disk folder or hub ORG/NAME"},
    )
    name: str | None = field(
        default=None, metadata={"help": "suffix of its column contaminated_<name> (default: the file's stem)"}
    )
    problem_column: str = field(default="problem", metadata={"help": "column with the benchmark's questions"})
    split: str = field(default="test", metadata={"help": "split of a save_to_disk DatasetDict or hub dataset"})
    subset: str | None = field(default=None, metadata={"help": "hub dataset config name (e.g. gpqa_diamond)"})

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gz").split(".", 1)[0]


@dataclass(frozen=True)
class DecontaminateConfig:
    dataset: str = field(
        default="embedded:train",
        metadata={"help": "training data: JSONL/Parquet file, save_to_disk folder, hub ORG/NAME or embedded:train"},
    )
    split: str = field(default="train", metadata={"help": "split of a save_to_disk DatasetDict or hub dataset"})
    subset: str | None = field(default=None, metadata={"help": "hub dataset config name"})
    problem_column: str = field(default="problem", metadata={"help": "column of the training rows' problems"})
    benchmarks: list[BenchmarkRef] = field(
        default_factory=lambda: [BenchmarkRef()], metadata={"help": "benchmarks to check against"}
    )
    ngram_size: int = field(default=8, metadata={"help": "words per n-gram (Open-R1: 8)"})
    mode: Literal["flag", "remove"] = field(
        default="flag", metadata={"help": "flag: add contaminated_<name> columns; remove: drop flagged rows"}
    )
    output_path: str = field(
        default="runs/decontaminate/decontaminated.jsonl",
        metadata={"help": "JSONL (or .parquet) file written whole, replacing any earlier one"},
    )

    def __post_init__(self) -> None:
        if self.ngram_size < 1:
            raise UserError(f"ngram_size must be >= 1, not {self.ngram_size}")
        if not self.benchmarks:
            raise UserError("benchmarks must list at least one benchmark")
        labels = [b.label for b in self.benchmarks]
        duplicate = next((x for x in labels if labels.count(x) > 1), None)
        if duplicate is not None:
            raise UserError(f"two benchmarks are both named '{duplicate}'; give one a different benchmarks.N.name")
        if not self.output_path.endswith((".jsonl", ".json", ".parquet")):
            raise UserError(f"output_path must end in .jsonl or .parquet, not '{self.output_path}'")


def load_decontaminate_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """A recipe from configs/decontaminate/ or a YAML path (None = all defaults), plus dotted overrides."""
    path = resolve_recipe(name_or_path, RECIPE_DIR) if name_or_path is not None else None
    return load_config(DecontaminateConfig, path, overrides, what="decontaminate config")


# ----------------------------------------------------------------------------------------------------------
# n-grams (Open-R1's normalize_string / word_ngrams)
# ----------------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def word_ngrams(text: str, n: int) -> set[str]:
    words = normalize_text(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def build_lookup(documents: Iterable[str], n: int) -> set[str]:
    lookup: set[str] = set()
    for document in documents:
        lookup |= word_ngrams(document, n)
    return lookup


def is_contaminated(text: str, lookup: set[str], n: int) -> bool:
    return not lookup.isdisjoint(word_ngrams(text, n))


# ----------------------------------------------------------------------------------------------------------
def run_decontaminate(cfg: DecontaminateConfig) -> dict[str, Any]:
    """Flag or remove the contaminated rows of `cfg.dataset`, write them to `cfg.output_path`, return the counts:
    {"rows", "kept", "contaminated": {benchmark: rows flagged}, "output_path"}."""
    rows, source = _read_dataset(cfg)
    lookups = {}
    for ref in cfg.benchmarks:
        bench_rows, bench_source = read_rows(
            BenchmarkConfig(path=ref.path, split=ref.split, subset=ref.subset, problem_column=ref.problem_column)
        )
        for i, row in enumerate(bench_rows):
            if ref.problem_column not in row:
                raise UserError(
                    f"benchmark '{bench_source}' has no column '{ref.problem_column}' (benchmarks.N.problem_column)"
                    + (f" in row {i}" if i else "")
                    + f"; it has {', '.join(sorted(map(str, row)))}"
                )
        lookups[ref.label] = build_lookup((_as_text(r[ref.problem_column]) for r in bench_rows), cfg.ngram_size)
    counts = dict.fromkeys(lookups, 0)
    out_rows = []
    for row in rows:
        grams = word_ngrams(_as_text(row[cfg.problem_column]), cfg.ngram_size)
        flags = {name: not lookup.isdisjoint(grams) for name, lookup in lookups.items()}
        for name, flagged in flags.items():
            counts[name] += flagged
        if cfg.mode == "remove":
            if not any(flags.values()):
                out_rows.append(row)
        else:
            out_rows.append(row | {f"contaminated_{name}": flagged for name, flagged in flags.items()})
    path = Path(cfg.output_path).expanduser()
    _write_rows_atomic(path, out_rows)
    return {
        "dataset": source,
        "rows": len(rows),
        "kept": len(out_rows),
        "contaminated": counts,
        "output_path": str(path),
    }


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def _read_dataset(cfg: DecontaminateConfig) -> tuple[list[dict[str, Any]], str]:
    from openr1_jax.data.config import DatasetSpec
    from openr1_jax.data.sources import open_table  # the data sources' reader: JSONL, Parquet, save_to_disk, hub

    source = cfg.dataset
    data, _ = open_table(DatasetSpec(path=source, split=cfg.split, name=cfg.subset))
    rows = data if isinstance(data, list) else data.to_pylist() if hasattr(data, "to_pylist") else data.to_list()
    if not rows:
        raise UserError(f"dataset '{source}' has no rows")
    for i, row in enumerate(rows):
        if cfg.problem_column not in row:
            raise UserError(
                f"dataset '{source}' has no column '{cfg.problem_column}' (problem_column)"
                + (f" in row {i}" if i else "")
                + f"; it has {', '.join(sorted(map(str, row)))}"
            )
    return rows, source


def _write_rows_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
