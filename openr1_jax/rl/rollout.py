"""Rollouts: prompts -> G completions each from the co-located engine -> rewards -> advantages -> the arrays of
one generation batch, laid out for the train step (see `rl/step.py` for the per-target layout).

The engine reads the train state's own parameter arrays (no copy, no server, no weight sync), so every
generation samples from the policy as it is after the last optimizer step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from openr1_jax.errors import UserError
from openr1_jax.generate.engine import Engine
from openr1_jax.generate.sampling import SamplingParams
from openr1_jax.rl.advantages import Advantages, group_advantages
from openr1_jax.rl.config import GRPOConfig, PromptDataSection
from openr1_jax.rl.rewards import call_reward


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------
def load_prompt_rows(section: PromptDataSection, path: str | None = None, limit: int | None = None) -> list[dict]:
    """Every row of the dataset (all columns: the rewards read them), checked to have the prompt column."""
    from openr1_jax.data.config import DatasetSpec
    from openr1_jax.data.sources import open_table

    path = path or section.path
    table, columns = open_table(DatasetSpec(path=path, split=section.split, name=section.name))
    if section.prompt_column not in columns:
        raise UserError(
            f"dataset {path!r} has no prompt column {section.prompt_column!r} (data.prompt_column); "
            f"its columns are {sorted(columns)}"
        )
    limit = limit or section.max_examples
    n = len(table) if limit is None else min(limit, len(table))
    if n == 0:
        raise UserError(f"dataset {path!r} has no rows")
    if isinstance(table, list):
        return table[:n]
    if hasattr(table, "to_pylist"):  # arrow
        return table.slice(0, n).to_pylist()
    return [table[i] for i in range(n)]  # datasets.Dataset


class PromptBuilder:
    """A row's prompt text: the chat template over [system?, user: problem] (or the row's own conversation),
    or `prompt_template` with `{prompt}` for plain-text (R1-Zero style) prompting."""

    def __init__(self, tokenizer, section: PromptDataSection):
        self.tokenizer, self.section = tokenizer, section
        self.conversational = section.prompt_template is None

    def __call__(self, row: dict) -> str:
        value = row[self.section.prompt_column]
        if not self.conversational:
            return self.section.prompt_template.format(prompt=value)
        messages = list(value) if isinstance(value, list) else [{"role": "user", "content": str(value)}]
        if self.section.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.section.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def ids(self, row: dict, max_length: int) -> list[int]:
        return self.encode(self(row), max_length)

    def encode(self, text: str, max_length: int) -> list[int]:
        """Token ids, the left cut to `max_length` as TRL does (the end of a prompt is what the model continues)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]


# ----------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------
def compute_rewards(
    funcs: Sequence[Callable], names: Sequence[str], completions: list, prompts: list, completion_ids: list, rows: list
) -> np.ndarray:
    """[N, F] float32, NaN where a reward returned None. Rewards get TRL's keyword arguments: `prompts`,
    `completion_ids` and every dataset column, one value per completion."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
    out = np.full((len(completions), len(funcs)), np.nan, np.float32)
    for j, (fn, name) in enumerate(zip(funcs, names, strict=True)):
        values = call_reward(name, fn, completions, prompts=prompts, completion_ids=completion_ids, **columns)
        out[:, j] = [np.nan if v is None else v for v in values]
    return out


# ----------------------------------------------------------------------------------------------------------
# One generation batch
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A generation batch of N = prompts x G completions, host-side numpy."""

    input_ids_NxT: np.ndarray  # int32: prompt, completion, padding
    valid_NxT: np.ndarray  # int32: 1 on prompt and completion tokens
    mask_NxT: np.ndarray  # float32: 1 where the *next* token is a completion token that counts in the loss
    old_logps_NxT: np.ndarray  # float32: the sampler's log-prob of the next token
    completion_lengths_N: np.ndarray  # int32
    truncated_N: np.ndarray  # bool: cut at max_completion_length (no EOS)
    rewards_NxF: np.ndarray
    advantages: Advantages
    prompts: list[str]
    completions: list[str]
    generation_seconds: float
    reward_seconds: float

    @property
    def size(self) -> int:
        return len(self.completions)

    def batch(self, rows: np.ndarray, ref_logps_NxT: np.ndarray | None, num_items: float) -> dict[str, np.ndarray]:
        """The train-step batch of `rows` (indices into this rollout)."""
        return {
            "input_ids": self.input_ids_NxT[rows],
            "valid": self.valid_NxT[rows],
            "mask": self.mask_NxT[rows],
            "old_logps": self.old_logps_NxT[rows],
            "ref_logps": (np.zeros_like(self.old_logps_NxT) if ref_logps_NxT is None else ref_logps_NxT)[rows],
            "advantages": self.advantages.advantages_N[rows].astype(np.float32),
            "num_items": np.asarray(num_items, np.float32),
        }


def sampling_params(cfg: GRPOConfig, seed: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=cfg.min_p,
        n=cfg.num_generations,
        seed=seed,
        logprobs=True,
    )


def generate_rollout(
    engine: Engine,
    rows: list[dict],
    builder: PromptBuilder,
    reward_funcs: Sequence[Callable],
    reward_names: Sequence[str],
    reward_weights: np.ndarray,
    cfg: GRPOConfig,
    seed: int,
) -> Rollout:
    """Sample G completions of each row's prompt (row i gets seed `seed + i`), score them, normalise."""
    G, P, C = cfg.num_generations, cfg.max_prompt_length, cfg.max_completion_length
    T = P + C
    prompt_texts = [builder(row) for row in rows]
    prompt_ids = [builder.encode(text, P) for text in prompt_texts]
    start = time.perf_counter()
    outputs = engine.generate(prompt_ids, [sampling_params(cfg, seed + i) for i in range(len(rows))])
    generation_seconds = time.perf_counter() - start

    N = len(rows) * G
    input_ids = np.full((N, T), engine.pad_id, np.int32)
    valid = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.float32)
    old_logps = np.zeros((N, T), np.float32)
    lengths = np.zeros((N,), np.int32)
    truncated = np.zeros((N,), bool)
    texts, prompts, token_lists, flat_rows = [], [], [], []
    for i, (out, row) in enumerate(zip(outputs, rows, strict=True)):
        p = len(out.prompt_token_ids)
        for completion in sorted(out.outputs, key=lambda c: c.index):
            n = i * G + completion.index
            c = len(completion.token_ids)
            input_ids[n, :p] = out.prompt_token_ids
            input_ids[n, p : p + c] = completion.token_ids
            valid[n, : p + c] = 1
            mask[n, p - 1 : p + c - 1] = 1.0  # logits at p - 1 predict the first completion token
            old_logps[n, p - 1 : p + c - 1] = completion.logprobs
            lengths[n] = c
            truncated[n] = completion.finish_reason == "length"
            texts.append(completion.text)
            token_lists.append(list(completion.token_ids))
            prompts.append(prompt_texts[i])
            flat_rows.append(row)
    if cfg.mask_truncated_completions:
        mask[truncated] = 0.0

    start = time.perf_counter()
    as_reward_input = [[{"role": "assistant", "content": t}] for t in texts] if builder.conversational else texts
    prompt_input = (
        [[{"role": "user", "content": str(r[builder.section.prompt_column])}] for r in flat_rows]
        if builder.conversational
        else prompts
    )
    rewards = compute_rewards(reward_funcs, reward_names, as_reward_input, prompt_input, token_lists, flat_rows)
    advantages = group_advantages(rewards, reward_weights, G, cfg.scale_rewards)
    reward_seconds = time.perf_counter() - start
    return Rollout(
        input_ids,
        valid,
        mask,
        old_logps,
        lengths,
        truncated,
        rewards,
        advantages,
        prompts,
        texts,
        generation_seconds,
        reward_seconds,
    )


def rollout_metrics(rollout: Rollout, reward_names: Sequence[str]) -> dict[str, float]:
    """TRL's per-generation metrics: each reward's mean/std (NaN-aware), the total, advantages, lengths."""
    metrics: dict[str, float] = {}
    for j, name in enumerate(reward_names):
        column = rollout.rewards_NxF[:, j]
        scored = column[~np.isnan(column)]
        metrics[f"rewards/{name}/mean"] = float(scored.mean()) if scored.size else math.nan
        metrics[f"rewards/{name}/std"] = float(scored.std(ddof=1)) if scored.size > 1 else 0.0
    adv = rollout.advantages
    metrics["reward"] = float(adv.rewards_N.mean())
    metrics["reward_std"] = float(adv.group_std_N.mean())
    metrics["frac_reward_zero_std"] = float(adv.std_zero_N.mean())
    metrics["advantages/mean"] = float(adv.advantages_N.mean())
    metrics["advantages/std"] = float(adv.advantages_N.std())
    metrics["advantages/max_abs"] = float(np.abs(adv.advantages_N).max())
    lengths = rollout.completion_lengths_N
    metrics["completions/mean_length"] = float(lengths.mean())
    metrics["completions/max_length"] = float(lengths.max())
    metrics["completions/min_length"] = float(lengths.min())
    metrics["completions/clipped_ratio"] = float(rollout.truncated_N.mean())
    metrics["tokens_per_sec/generation"] = float(lengths.sum() / max(rollout.generation_seconds, 1e-9))
    metrics["seconds/generation"] = rollout.generation_seconds
    metrics["seconds/rewards"] = rollout.reward_seconds
    return metrics


def sample_log(rollout: Rollout, count: int) -> list[dict[str, Any]]:
    """The first `count` completions with their prompt, rewards and advantage (for samples.jsonl / TB text)."""
    return [
        {
            "prompt": rollout.prompts[n],
            "completion": rollout.completions[n],
            "rewards": [None if np.isnan(r) else float(r) for r in rollout.rewards_NxF[n]],
            "advantage": float(rollout.advantages.advantages_N[n]),
        }
        for n in range(min(count, rollout.size))
    ]
