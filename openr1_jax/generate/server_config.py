"""The `serve` config: which checkpoint to load, how to batch, where to listen (`configs/serve/*.yaml` + overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.structured import load_config
from openr1_jax.train.config import resolve_recipe

RECIPE_DIR = config_dir("serve")


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(
        default="runs/sft-default/model",
        metadata={"help": "Hugging Face folder or openr1-jax checkpoint to serve (default: the embedded SFT run's)"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer folder; null = the one saved with the model, 'embedded' = the bundled one"},
    )
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "compute dtype"})
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "ModelConfig fields to change, e.g. {attention_impl: pallas} for the decode kernels"},
    )
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "the model name clients send and /v1/models lists (default: `model`)"},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 = any free port)"})
    max_batch_size: int = field(default=32, metadata={"help": "prompts decoded together in one engine call"})
    max_seq_len: int | None = field(
        default=None, metadata={"help": "prompt + completion tokens per request (default: the model's maximum)"}
    )
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "how long the engine waits for more requests to join a batch"}
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("model must name a Hugging Face folder or openr1-jax checkpoint")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be between 0 and 65535, not {self.port}")
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size must be positive, not {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise UserError(f"max_seq_len must be at least 2, not {self.max_seq_len}")
        if self.batch_wait_ms < 0:
            raise UserError(f"batch_wait_ms must not be negative, not {self.batch_wait_ms}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_serve_config(name_or_path: str | None = "default", overrides: list[str] | tuple[str, ...] = ()) -> ServeConfig:
    """A YAML path or a recipe name from `configs/serve/` (None = all defaults) plus dotted overrides."""
    return load_config(ServeConfig, resolve_recipe(name_or_path, RECIPE_DIR), overrides, what="serve config")
