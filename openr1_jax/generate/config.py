"""The `generate` job's config: prompts from a dataset -> completions from a model -> a resumable JSONL file.

Open-R1 step 1 distils reasoning traces from DeepSeek-R1 with distilabel (`src/open_r1/generate.py`): a dataset
column formatted into a prompt template, `num_generations` samples per prompt from an OpenAI-compatible vLLM
server, then math-verify and pass-rate filtering. This config names the same knobs: `dataset.prompt_column`,
`prompt_template`, `num_generations`, `sampling.{temperature,top_p,max_new_tokens}`, `openai.{base_url,model,
timeout_s,max_retries}`, `filters.{pass_rate_min,pass_rate_max}`. `backend: engine` runs our own JAX engine
in-process instead of calling a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.structured import load_config
from openr1_jax.train.config import resolve_recipe

RECIPE_DIR = config_dir("generate")


@dataclass(frozen=True)
class DatasetSection:
    path: str = field(
        default="embedded:test",
        metadata={"help": "JSONL/Parquet file, save_to_disk folder, hub name, or embedded:train / embedded:test"},
    )
    split: str = field(default="train", metadata={"help": "split to read (save_to_disk DatasetDict or hub)"})
    name: str | None = field(default=None, metadata={"help": "Hugging Face dataset config name"})
    prompt_column: str = field(
        default="prompt", metadata={"help": "column with the problem text; `{prompt}` in prompt_template is its value"}
    )
    id_column: str | None = field(
        default=None, metadata={"help": "column with a unique row id (resume matches rows by it); null = row index"}
    )
    max_examples: int | None = field(default=None, metadata={"help": "use only the first N rows"})

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError("dataset.path must not be empty")
        if not self.prompt_column:
            raise UserError("dataset.prompt_column must not be empty")
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"dataset.max_examples must be >= 1, not {self.max_examples}")


@dataclass(frozen=True)
class SamplingSection:
    """Passed to the engine's SamplingParams, or sent in each request to the endpoint (vLLM field names)."""

    temperature: float = field(default=1.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=-1, metadata={"help": "keep the k most likely tokens; -1 = off"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top token's probability"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens generated per completion at most"})
    seed: int | None = field(
        default=42,
        metadata={"help": "base seed: each row draws from a seed derived from it and the row id (null = unseeded)"},
    )
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings (the text ends before them)"})

    def __post_init__(self) -> None:
        problems = [
            (self.temperature >= 0, f"sampling.temperature must be >= 0, not {self.temperature}"),
            (0 < self.top_p <= 1, f"sampling.top_p must lie in (0, 1], not {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"sampling.top_k must be -1 (off) or >= 1, not {self.top_k}"),
            (0 <= self.min_p <= 1, f"sampling.min_p must lie in [0, 1], not {self.min_p}"),
            (self.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1, not {self.max_new_tokens}"),
            (all(self.stop), "sampling.stop must not contain empty strings"),
            (self.seed is None or self.seed >= 0, f"sampling.seed must be >= 0, not {self.seed}"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(message)


@dataclass(frozen=True)
class EngineSection:
    model: str = field(
        default="runs/sft-default/model",
        metadata={"help": "Hugging Face folder or openr1-jax checkpoint to sample from (backend: engine)"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder or 'embedded'; null = the one saved with the model"}
    )
    dtype: Literal["float32", "bfloat16"] = field(default="bfloat16", metadata={"help": "compute dtype"})
    max_batch_size: int = field(default=32, metadata={"help": "sequences decoded together"})
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "ModelConfig fields to change, e.g. {attention_impl: pallas} for the decode kernels"},
    )
    max_seq_len: int | None = field(
        default=None, metadata={"help": "prompt + completion tokens at most (null = the model's context length)"}
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError("engine.model must name a model folder or checkpoint")
        if self.max_batch_size < 1:
            raise UserError(f"engine.max_batch_size must be >= 1, not {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise UserError(f"engine.max_seq_len must be >= 2, not {self.max_seq_len}")


@dataclass(frozen=True)
class OpenAISection:
    base_url: str = field(
        default="http://localhost:8000/v1", metadata={"help": "OpenAI-compatible server (vLLM, SGLang, `serve`)"}
    )
    model: str | None = field(default=None, metadata={"help": "model name to request; null = the server's first"})
    api_key_env: str | None = field(
        default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key (unset = no key)"}
    )
    endpoint: Literal["chat", "completions"] = field(
        default="chat",
        metadata={"help": "chat: /chat/completions (the server applies the chat template); completions: raw text"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer whose chat template renders prompts for the completions endpoint"},
    )
    max_concurrency: int = field(default=16, metadata={"help": "requests in flight at once"})
    timeout_s: float = field(default=900.0, metadata={"help": "seconds one request may take"})
    max_retries: int = field(
        default=3, metadata={"help": "retries of a request after connection errors, timeouts, 429 and 5xx"}
    )
    backoff_s: float = field(default=1.0, metadata={"help": "first wait before a retry; doubles each time (max 60)"})

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"openai.base_url must start with http:// or https://, not {self.base_url!r}")
        if self.max_concurrency < 1:
            raise UserError(f"openai.max_concurrency must be >= 1, not {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise UserError(f"openai.timeout_s must be > 0, not {self.timeout_s}")
        if self.max_retries < 0 or self.backoff_s < 0:
            raise UserError("openai.max_retries and openai.backoff_s must not be negative")


@dataclass(frozen=True)
class FilterSection:
    """Open-R1 keeps a distilled trace when math-verify finds its answer equal to the reference, and keeps a
    problem for RL when the fraction of correct samples (its pass rate) lies in a band."""

    math_verify: bool = field(
        default=False, metadata={"help": "score each generation's answer against reference_column with math-verify"}
    )
    reference_column: str = field(default="answer", metadata={"help": "column with the reference answer"})
    pass_rate_min: float = field(default=0.0, metadata={"help": "keep rows whose pass rate is >= this"})
    pass_rate_max: float = field(default=1.0, metadata={"help": "keep rows whose pass rate is <= this"})
    timeout_s: float = field(default=5.0, metadata={"help": "seconds math-verify may spend on one generation"})
    workers: int = field(default=1, metadata={"help": "math-verify worker processes"})

    def __post_init__(self) -> None:
        if not 0 <= self.pass_rate_min <= self.pass_rate_max <= 1:
            raise UserError(
                f"filters need 0 <= pass_rate_min <= pass_rate_max <= 1, not {self.pass_rate_min} and "
                f"{self.pass_rate_max}"
            )
        if not self.timeout_s > 0 or self.workers < 1:
            raise UserError("filters.timeout_s must be > 0 and filters.workers >= 1")


@dataclass(frozen=True)
class GenerateConfig:
    output_path: str = field(
        default="runs/generate/generations.jsonl",
        metadata={"help": "JSONL file, one line per dataset row; an existing one is resumed"},
    )
    resume: bool = field(
        default=True, metadata={"help": "skip rows already in output_path (false: refuse an existing file)"}
    )
    backend: Literal["engine", "openai"] = field(
        default="engine", metadata={"help": "engine: our JAX engine in-process; openai: an OpenAI-compatible server"}
    )
    num_generations: int = field(default=1, metadata={"help": "completions sampled per prompt"})
    batch_size: int = field(
        default=16, metadata={"help": "rows generated and appended together (engine backend; a kill loses one batch)"}
    )
    prompt_template: str = field(
        default="{prompt}",
        metadata={
            "help": "Python format string over the row's columns ({prompt} = prompt_column); literal braces "
            "are doubled: \\boxed{{}}"
        },
    )
    use_chat_template: bool = field(
        default=True, metadata={"help": "send the prompt as a user message (false: raw text continuation)"}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "system message before the user's"})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (or a path to one) overriding the tokenizer's"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (rows, tokens/s)"})
    dataset: DatasetSection = field(default_factory=DatasetSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    engine: EngineSection = field(default_factory=EngineSection)
    openai: OpenAISection = field(default_factory=OpenAISection)
    filters: FilterSection = field(default_factory=FilterSection)

    def __post_init__(self) -> None:
        if not self.output_path:
            raise UserError("output_path must name a JSONL file")
        if self.num_generations < 1:
            raise UserError(f"num_generations must be >= 1, not {self.num_generations}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, not {self.batch_size}")
        if not self.use_chat_template and (self.system_prompt is not None or self.chat_template is not None):
            raise UserError("system_prompt and chat_template need use_chat_template: true")
        if self.backend == "openai":
            if self.openai.endpoint == "chat" and not self.use_chat_template:
                raise UserError(
                    "openai.endpoint 'chat' always applies the server's chat template; use endpoint 'completions' "
                    "for raw text prompts (use_chat_template: false)"
                )
            if self.openai.endpoint == "completions" and self.use_chat_template and self.openai.tokenizer is None:
                raise UserError(
                    "openai.endpoint 'completions' with use_chat_template needs openai.tokenizer to render the chat "
                    "template (or use endpoint 'chat')"
                )


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_generate_config(
    name_or_path: str | None = "default", overrides: list[str] | tuple[str, ...] = ()
) -> GenerateConfig:
    """A recipe name from configs/generate/ or a YAML path, plus dotted `key=value` overrides."""
    return load_config(GenerateConfig, resolve_recipe(name_or_path, RECIPE_DIR), overrides, what="generate config")
