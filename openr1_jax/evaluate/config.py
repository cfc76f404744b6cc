"""The `evaluate` config: a model, a benchmark, a prompt, sampling, scoring and where the report goes.

Defaults follow Open-R1's evaluation (lighteval on vLLM): the chat template on, temperature 0.6, top_p 0.95,
32768 new tokens at most, pass@1 estimated from `num_samples` completions per problem (DeepSeek-R1 samples 4 to
64 per problem depending on the benchmark's size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from openr1_jax.errors import UserError
from openr1_jax.evaluate.benchmarks import DEFAULT_TEMPLATES, BenchmarkConfig, check_template
from openr1_jax.models.presets import config_dir
from openr1_jax.structured import load_config
from openr1_jax.train.config import resolve_recipe

RECIPE_DIR = config_dir("evaluate")


@dataclass(frozen=True)
class ModelSection:
    name_or_path: str = field(
        default="runs/sft-default/model", metadata={"help": "Hugging Face folder or openr1-jax checkpoint"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder or 'embedded'; null = the one saved with the model"}
    )
    dtype: Literal["float32", "bfloat16"] = field(default="bfloat16", metadata={"help": "compute dtype"})
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "ModelConfig fields to change, e.g. {attention_impl: pallas} for the decode kernels"},
    )
    max_seq_len: int | None = field(
        default=None,
        metadata={"help": "prompt + completion tokens at most (null = the model's context length)"},
    )

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise UserError("model.name_or_path must name a model folder or checkpoint")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise UserError(f"model.max_seq_len must be >= 2, not {self.max_seq_len}")


@dataclass(frozen=True)
class PromptSection:
    template: str | None = field(
        default=None,
        metadata={
            "help": "user message with {problem} (and {choices}, {letters} for multiple choice); null = "
            "lighteval's math or GPQA query for the task"
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "system message before the user's"})
    use_chat_template: bool = field(
        default=True, metadata={"help": "wrap the prompt in the tokenizer's chat template (false: raw text)"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (or a path to one) overriding the tokenizer's"}
    )


@dataclass(frozen=True)
class SamplingSection:
    temperature: float = field(default=0.6, metadata={"help": "0 = greedy (then use num_samples 1)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=-1, metadata={"help": "keep the k most likely tokens; -1 = off"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top token's probability"})
    max_new_tokens: int = field(
        default=32768,
        metadata={"help": "tokens per completion at most (cut to what fits in model.max_seq_len after the prompt)"},
    )
    num_samples: int = field(default=1, metadata={"help": "completions per problem (n): pass@1 is their mean"})
    pass_k: list[int] = field(default_factory=lambda: [1], metadata={"help": "k values of pass@k to report (<= n)"})
    seed: int = field(default=0, metadata={"help": "base seed: each problem samples from a seed derived from its id"})

    def __post_init__(self) -> None:
        problems = [
            (self.temperature >= 0, f"sampling.temperature must be >= 0, not {self.temperature}"),
            (0 < self.top_p <= 1, f"sampling.top_p must lie in (0, 1], not {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"sampling.top_k must be -1 (off) or >= 1, not {self.top_k}"),
            (0 <= self.min_p <= 1, f"sampling.min_p must lie in [0, 1], not {self.min_p}"),
            (self.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1, not {self.max_new_tokens}"),
            (self.num_samples >= 1, f"sampling.num_samples must be >= 1, not {self.num_samples}"),
            (bool(self.pass_k), "sampling.pass_k must list at least one k"),
            (self.seed >= 0, f"sampling.seed must be >= 0, not {self.seed}"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)
        for k in self.pass_k:
            if k < 1:
                raise UserError(f"sampling.pass_k holds {k}; every k must be >= 1")
            if k > self.num_samples:
                raise UserError(
                    f"sampling.pass_k holds {k} but sampling.num_samples is {self.num_samples}: pass@{k} needs at "
                    f"least {k} samples per problem"
                )


@dataclass(frozen=True)
class ScoringSection:
    num_workers: int = field(default=2, metadata={"help": "math-verify worker processes"})
    timeout_s: float = field(
        default=10.0, metadata={"help": "seconds one answer may take to score; past it the answer scores 0"}
    )

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise UserError(f"scoring.num_workers must be >= 1, not {self.num_workers}")
        if not self.timeout_s > 0:
            raise UserError(f"scoring.timeout_s must be > 0, not {self.timeout_s}")


@dataclass(frozen=True)
class EvaluateConfig:
    output_path: str | None = field(
        default=None, metadata={"help": "JSON report (null = runs/evaluate/<benchmark>.json); replaced whole"}
    )
    batch_size: int = field(default=32, metadata={"help": "sequences decoded together (engine slots)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    model: ModelSection = field(default_factory=ModelSection)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, not {self.batch_size}")
        check_template(self.template, self.benchmark.task)

    @property
    def template(self) -> str:
        return self.prompt.template if self.prompt.template is not None else DEFAULT_TEMPLATES[self.benchmark.task]

    @property
    def report_path(self) -> str:
        if self.output_path is not None:
            return self.output_path
        stem = self.benchmark.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gz").rsplit(".", 1)[0]
        return f"runs/evaluate/{stem or 'benchmark'}.json"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_evaluate_config(name_or_path: str | None = "embedded", overrides: list[str] | tuple[str, ...] = ()):
    """A recipe name from configs/evaluate/ (or a YAML path; None = all defaults) plus dotted overrides."""
    return load_config(EvaluateConfig, resolve_recipe(name_or_path, RECIPE_DIR), overrides, what="evaluate config")
