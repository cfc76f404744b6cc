"""SFT data configuration: which datasets to mix, how to template and tokenize them, how to pack rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from openr1_jax.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the mixture: where its rows are and which columns hold the conversation."""

    path: str = field(
        default="embedded:train",
        metadata={"help": "JSONL/Parquet file, save_to_disk folder, hub name, or embedded:train / embedded:test"},
    )
    weight: float = field(default=1.0, metadata={"help": "relative share of this dataset in the mixture"})
    split: str = field(default="train", metadata={"help": "split to read (save_to_disk DatasetDict or hub)"})
    name: str | None = field(default=None, metadata={"help": "Hugging Face dataset config name"})
    messages_column: str = field(default="messages", metadata={"help": "column with a list of {role, content}"})
    prompt_column: str = field(default="prompt", metadata={"help": "prompt column (used when no messages)"})
    completion_column: str = field(default="completion", metadata={"help": "completion column (used when no messages)"})
    max_examples: int | None = field(default=None, metadata={"help": "keep only the first N rows"})

    def __post_init__(self):
        if not self.path:
            raise UserError("data.datasets[].path must not be empty.")
        if not self.weight > 0:
            raise UserError(f"data.datasets[].weight must be > 0 for {self.path!r}, got {self.weight}.")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"data.datasets[].max_examples must be >= 1 for {self.path!r}, got {self.max_examples}.")


@dataclass(frozen=True)
class DataConfig:
    """The SFT data pipeline: mixture -> chat template -> tokens -> packed rows of `seq_len`."""

    datasets: list[DatasetSpec] = field(
        default_factory=lambda: [DatasetSpec()], metadata={"help": "datasets of the mixture"}
    )
    tokenizer: str = field(
        default="embedded", metadata={"help": "tokenizer folder or hub name; 'embedded' = the bundled one"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (or a path to one) overriding the tokenizer's"}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system message prepended to conversations that have none"}
    )
    eos_token: str | None = field(default=None, metadata={"help": "override the tokenizer's EOS token"})
    seq_len: int = field(default=512, metadata={"help": "tokens per packed row"})
    overlong: Literal["truncate", "drop"] = field(
        default="truncate", metadata={"help": "what to do with examples longer than seq_len"}
    )
    shuffle_seed: int = field(default=0, metadata={"help": "seed of the example shuffle (reshuffled each epoch)"})
    pack: bool = field(default=True, metadata={"help": "pack several examples per row (False: one per row)"})

    def __post_init__(self):
        if not self.datasets:
            raise UserError("data.datasets must list at least one dataset.")
        for i, spec in enumerate(self.datasets):
            if not isinstance(spec, DatasetSpec):
                raise UserError(f"data.datasets[{i}] must be a DatasetSpec, got {type(spec).__name__}.")
        if not self.tokenizer:
            raise UserError("data.tokenizer must not be empty.")
        if self.seq_len < 2:
            raise UserError(f"data.seq_len must be >= 2, got {self.seq_len}.")
        if self.overlong not in ("truncate", "drop"):
            raise UserError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}.")
        if not 0 <= self.shuffle_seed < 2**32:
            raise UserError(f"data.shuffle_seed must be in [0, 2**32), got {self.shuffle_seed}.")
