"""The SFT run config: one tree of small sections, read from `configs/sft/*.yaml` plus dotted overrides.

Option names follow TRL/Open-R1 where they have one (`learning_rate`, `lr_scheduler_type`, `warmup_ratio`,
`max_grad_norm`, `num_train_epochs`, `save_steps`, `logging_steps`); `batch_size` is the *global* number of
packed rows per optimizer step (all hosts together), which is what a TPU pod user sizes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openr1_jax.data.config import DataConfig
from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.sharding.mesh import MeshConfig
from openr1_jax.structured import load_config
from openr1_jax.train.checkpointing import CheckpointConfig
from openr1_jax.train.metrics_log import LoggingConfig
from openr1_jax.train.optimizer import OptimizerConfig
from openr1_jax.train.step import StepConfig

RECIPE_DIR = config_dir("sft")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelSection:
    name_or_path: str = field(
        default="demo-moe",
        metadata={
            "help": "model preset or model YAML (random init), or a Hugging Face folder / openr1-jax checkpoint "
            "(weights loaded)"
        },
    )
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "ModelConfig fields to change, e.g. {remat: full, moe_impl: dense}"}
    )
    dtype: Literal["float32", "bfloat16"] = field(default="bfloat16", metadata={"help": "compute dtype"})
    param_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "parameter (and optimizer state) dtype: float32 master weights"}
    )


@dataclass(frozen=True)
class EvalSection:
    dataset: str | None = field(
        default=None,
        metadata={"help": "rows with problem/messages and answer scored by greedy decoding at the end of the run"},
    )
    num_examples: int = field(default=200, metadata={"help": "held-out problems to score"})
    max_new_tokens: int = field(default=128, metadata={"help": "greedy decode length"})
    batch_size: int = field(default=64, metadata={"help": "prompts decoded together"})

    def __post_init__(self) -> None:
        if self.num_examples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("evaluation.num_examples, max_new_tokens and batch_size must be positive")


@dataclass(frozen=True)
class SFTConfig:
    output_dir: str = field(default="runs/sft", metadata={"help": "checkpoints, metrics, plots and the final model"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in output_dir"})
    seed: int = field(default=42, metadata={"help": "model init and training randomness"})
    batch_size: int = field(default=32, metadata={"help": "global packed rows per optimizer step (all hosts)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = num_train_epochs over the data"})
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the data when max_steps is -1"})
    export_hf: bool = field(default=False, metadata={"help": "also write the final model as a Hugging Face folder"})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "per-device peak for the MFU estimate (default: known TPUs/GPUs)"}
    )
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: StepConfig = field(default_factory=StepConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be positive, not {self.batch_size}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"max_steps must be positive or -1, not {self.max_steps}")
        if self.num_train_epochs < 1:
            raise UserError(f"num_train_epochs must be positive, not {self.num_train_epochs}")
        if self.batch_size % self.training.gradient_accumulation_steps:
            raise UserError(
                f"batch_size ({self.batch_size}) must be divisible by training.gradient_accumulation_steps "
                f"({self.training.gradient_accumulation_steps})"
            )


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | None, recipe_dir: Path = RECIPE_DIR) -> Path | None:
    """A YAML path, or a recipe name from `configs/<kind>/`; None = all defaults."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or path.is_file():
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist")
        return path
    recipe = recipe_dir / f"{name_or_path}.yaml"
    if not recipe.is_file():
        names = sorted(p.stem for p in recipe_dir.glob("*.yaml"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"unknown recipe '{name_or_path}'{hint}: available recipes are {', '.join(names)}")
    return recipe


def load_sft_config(name_or_path: str | None = "default", overrides: list[str] | tuple[str, ...] = ()) -> SFTConfig:
    return load_config(SFTConfig, resolve_recipe(name_or_path), overrides, what="SFT config")
