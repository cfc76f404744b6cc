"""Held-out scoring of a policy: greedy completions of each problem, scored by the `accuracy` and `format`
rewards, reported as accuracy, format rate and mean completion length (the demo's table columns)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from openr1_jax.generate.engine import Engine
from openr1_jax.generate.sampling import SamplingParams
from openr1_jax.rl.rollout import PromptBuilder


def heldout_scores(
    engine: Engine,
    rows: list[dict],
    builder: PromptBuilder,
    max_new_tokens: int,
    max_prompt_length: int,
    accuracy: Callable,
    format_reward: Callable,
) -> dict:
    """{accuracy, format_rate, mean_length, n, samples}: greedy decoding, one completion per problem."""
    prompt_ids = [builder.ids(row, max_prompt_length) for row in rows]
    outputs = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    texts = [out.outputs[0].text for out in outputs]
    lengths = np.array([len(out.outputs[0].token_ids) for out in outputs], np.float32)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if builder.conversational else texts
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    correct = [v == 1.0 for v in accuracy(completions, **columns)]
    formatted = [v == 1.0 for v in format_reward(completions, **columns)]
    samples = [
        {"problem": str(row[builder.section.prompt_column]), "completion": text, "correct": ok}
        for row, text, ok in zip(rows[:5], texts, correct, strict=False)
    ]
    return {
        "accuracy": float(np.mean(correct)),
        "format_rate": float(np.mean(formatted)),
        "mean_length": float(lengths.mean()),
        "n": len(rows),
        "samples": samples,
    }
