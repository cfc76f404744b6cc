"""The GRPO run config: `configs/grpo/*.yaml` plus dotted overrides, with TRL's option names.

Batch sizes are global, as a TPU pod user sizes them: `batch_size` completions feed one optimizer step (TRL:
per_device_train_batch_size x processes x gradient_accumulation_steps). As in TRL, `steps_per_generation`
counts micro-batches: one generation samples `batch_size / gradient_accumulation_steps * steps_per_generation`
completions (`num_generations` per prompt), which are then used for `steps_per_generation /
gradient_accumulation_steps` optimizer steps, `num_iterations` times over (mu in the GRPO paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.sharding.mesh import MeshConfig
from openr1_jax.structured import load_config
from openr1_jax.train.checkpointing import CheckpointConfig
from openr1_jax.train.config import ModelSection, resolve_recipe
from openr1_jax.train.metrics_log import LoggingConfig
from openr1_jax.train.optimizer import OptimizerConfig

RECIPE_DIR = config_dir("grpo")


@dataclass(frozen=True)
class PromptDataSection:
    """Prompts (and the columns the rewards read, e.g. `solution`) from one dataset."""

    path: str = field(
        default="embedded:train",
        metadata={"help": "JSONL/Parquet file, save_to_disk folder, hub name, or embedded:train / embedded:test"},
    )
    split: str = field(default="train", metadata={"help": "split to read (save_to_disk DatasetDict or hub)"})
    name: str | None = field(default=None, metadata={"help": "Hugging Face dataset config name"})
    prompt_column: str = field(
        default="problem", metadata={"help": "column with the problem text or a conversation (Open-R1's default)"}
    )
    max_examples: int | None = field(default=None, metadata={"help": "use only the first N rows"})
    tokenizer: str = field(default="embedded", metadata={"help": "tokenizer folder or hub name; 'embedded' = ours"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template (or a path to one)"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message put before every problem"})
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "plain-text template with {prompt} used instead of the chat template (R1-Zero style)"},
    )
    shuffle_seed: int = field(default=0, metadata={"help": "seed of the prompt order (reshuffled each epoch)"})

    def __post_init__(self) -> None:
        if not self.path or not self.prompt_column:
            raise UserError("data.path and data.prompt_column must not be empty")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"data.max_examples must be >= 1, not {self.max_examples}")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise UserError("data.prompt_template must contain {prompt}")


@dataclass(frozen=True)
class RolloutSection:
    """How the co-located engine samples (its slots and host round trips; not the sampling distribution)."""

    max_batch_size: int = field(default=64, metadata={"help": "sequences decoded together by the engine"})
    chunk_size: int = field(default=32, metadata={"help": "decode steps between host checks"})

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.chunk_size < 1:
            raise UserError("rollout.max_batch_size and rollout.chunk_size must be >= 1")


@dataclass(frozen=True)
class GRPOEvalSection:
    dataset: str | None = field(
        default=None, metadata={"help": "held-out rows (same columns as data) scored by greedy decoding"}
    )
    num_examples: int = field(default=200, metadata={"help": "held-out problems to score"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N optimizer steps (0 = start and end)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "greedy length; None = max_completion_length"})

    def __post_init__(self) -> None:
        if self.num_examples < 1 or self.eval_steps < 0:
            raise UserError("evaluation.num_examples must be >= 1 and evaluation.eval_steps >= 0")


@dataclass(frozen=True)
class GRPOConfig:
    output_dir: str = field(default="runs/grpo", metadata={"help": "checkpoints, metrics, samples and the model"})
    resume: bool = field(default=True, metadata={"help": "continue from the latest checkpoint in output_dir"})
    seed: int = field(default=42, metadata={"help": "init, sampling and shuffling randomness"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = num_train_epochs over the prompts"})
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the prompts when max_steps is -1"})
    export_hf: bool = field(default=False, metadata={"help": "also write the final model as a Hugging Face folder"})
    # --- batch geometry (TRL names) -------------------------------------------------------------------------
    batch_size: int = field(default=64, metadata={"help": "global completions per optimizer step (all hosts)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per prompt"})
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "micro-batches per generation (TRL); None = gradient_accumulation_steps"}
    )
    num_iterations: int = field(default=1, metadata={"help": "mu: passes over each generation batch"})
    # --- the objective (TRL names) ---------------------------------------------------------------------------
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(
        default="dapo", metadata={"help": "normalisation of the token losses (TRL's loss_type)"}
    )
    importance_sampling_level: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "token (GRPO) or sequence (GSPO) importance ratios"}
    )
    beta: float = field(default=0.0, metadata={"help": "KL weight against the frozen reference (0: no reference)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range of the ratio"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip range (DAPO); None = epsilon"})
    delta: float | None = field(default=None, metadata={"help": "two-sided clipping: cap the ratio at delta"})
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group", metadata={"help": "divide advantages by the group's std, the batch's std, or nothing"}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "reward names (openr1_jax.rl.rewards) or dotted paths to functions"},
    )
    reward_weights: list[float] | None = field(default=None, metadata={"help": "one weight per reward; None = 1s"})
    reward_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "options per reward name, e.g. {format: {answer: boxed}}"}
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "exclude completions cut at max_completion_length from the loss"}
    )
    # --- sampling (TRL names) ---------------------------------------------------------------------------------
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also divides training logits)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=-1, metadata={"help": "keep the k most likely tokens; -1 = off"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top token's probability"})
    max_prompt_length: int = field(default=512, metadata={"help": "prompt tokens kept (the left is cut, as TRL)"})
    max_completion_length: int = field(default=256, metadata={"help": "tokens generated per completion at most"})
    # --- MoE ------------------------------------------------------------------------------------------------
    bias_update_rate: float = field(
        default=0.0, metadata={"help": "router correction-bias speed during RL (0 keeps the routing bias fixed)"}
    )
    # --- logging ----------------------------------------------------------------------------------------------
    log_completions: bool = field(default=True, metadata={"help": "log sample completions (samples.jsonl, TB)"})
    num_completions_to_print: int = field(default=2, metadata={"help": "completions logged per logging step"})
    model: ModelSection = field(default_factory=ModelSection)
    data: PromptDataSection = field(default_factory=PromptDataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: GRPOEvalSection = field(default_factory=GRPOEvalSection)

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean form
            object.__setattr__(self, "scale_rewards", "group" if self.scale_rewards else "none")
        checks = [
            (self.batch_size >= 1, f"batch_size must be positive, not {self.batch_size}"),
            (self.max_steps == -1 or self.max_steps >= 1, f"max_steps must be positive or -1, not {self.max_steps}"),
            (self.num_train_epochs >= 1, "num_train_epochs must be positive"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (
                self.num_generations >= 2,
                f"num_generations must be >= 2 (a group needs a baseline), not {self.num_generations}",
            ),
            (self.steps_per_generation is None or self.steps_per_generation >= 1, "steps_per_generation must be >= 1"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"), f"unknown loss_type '{self.loss_type}'"),
            (
                self.importance_sampling_level in ("token", "sequence"),
                "importance_sampling_level must be token or sequence",
            ),
            (self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be group, batch or none"),
            (self.beta >= 0, "beta must be >= 0"),
            (self.epsilon > 0 and (self.epsilon_high is None or self.epsilon_high > 0), "epsilon must be > 0"),
            (self.delta is None or self.delta > 1, "delta must be > 1 (it caps the importance ratio)"),
            (bool(self.reward_funcs), "reward_funcs must name at least one reward"),
            (self.temperature > 0, "temperature must be > 0 (GRPO samples; the loss divides logits by it)"),
            (
                self.max_prompt_length >= 1 and self.max_completion_length >= 1,
                "max_prompt_length and max_completion_length must be >= 1",
            ),
            (self.bias_update_rate >= 0, "bias_update_rate must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid GRPO config: {message}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs"
            )
        unused = sorted(set(self.reward_kwargs) - set(self.reward_funcs))
        if unused:
            raise UserError(f"reward_kwargs names {unused}, which are not in reward_funcs {self.reward_funcs}")
        k = self.gradient_accumulation_steps
        if self.batch_size % k:
            raise UserError(f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps ({k})")
        if self.generation_steps % k:
            raise UserError(
                f"steps_per_generation ({self.generation_steps}) must be a multiple of gradient_accumulation_steps "
                f"({k}): every generation feeds whole optimizer steps"
            )
        if self.generation_batch_size % self.num_generations:
            raise UserError(
                f"the generation batch ({self.generation_batch_size} completions = batch_size / "
                f"gradient_accumulation_steps x steps_per_generation) must be divisible by num_generations "
                f"({self.num_generations})"
            )

    # --- derived sizes ------------------------------------------------------------------------------------------
    @property
    def generation_steps(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps

    @property
    def generation_batch_size(self) -> int:
        """Completions sampled per generation."""
        return self.micro_batch_size * self.generation_steps

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations

    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps each generation feeds (all num_iterations passes)."""
        return self.generation_steps // self.gradient_accumulation_steps * self.num_iterations


def load_grpo_config(name_or_path: str | None = "default", overrides: list[str] | tuple[str, ...] = ()) -> GRPOConfig:
    return load_config(GRPOConfig, resolve_recipe(name_or_path, RECIPE_DIR), overrides, what="GRPO config")
