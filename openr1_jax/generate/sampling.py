"""Sampling parameters and the per-row token sampler (temperature, top-k, top-p, min-p, seeds, logprobs).

Every parameter is a per-row array inside the jitted decode loop, so one batch mixes requests with different
settings (the server batches whatever arrives). The filters follow vLLM's order: scale by 1/temperature, keep
the top-k tokens, keep the smallest prefix of those (renormalised) whose mass reaches top-p, and drop tokens
whose probability is below min-p times the most likely one's. Temperature 0 is greedy.

Logprobs are those of the temperature-scaled distribution before filtering, log_softmax(logits / temperature)
(the raw log_softmax when greedy): the quantity TRL's GRPO recomputes in training, so old and new policy
log-probs are comparable.

Randomness is per row: row r's key at its s-th sampled token is fold_in(fold_in(key(seed_r), sample_r), s),
so a request's output depends on its seed and sample index alone, not on which batch it rode in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from openr1_jax.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    n: int = 1  # samples per prompt, sharing the prompt's prefill
    seed: int | None = None  # None: the engine draws one
    stop: tuple[str, ...] = ()  # stop strings (the text ends before them)
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS
    logprobs: bool = True  # return the sampled tokens' logprobs
    ignore_eos: bool = False  # keep going past EOS (benchmarks); stop_token_ids still stop

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must lie in [0, 1], got {self.min_p}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (all(self.stop), "stop strings must not be empty"),
        ]
        for ok, message in problems:
            if not ok:
                raise UserError(f"sampling parameter {message}")

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclass
class RowSampling:
    """SamplingParams of every row as device arrays [B]."""

    temperature_B: jax.Array
    top_k_B: jax.Array  # int32, V = off
    top_p_B: jax.Array
    min_p_B: jax.Array
    key_data_BxK: jax.Array  # one PRNG key per row, fold_in(key(seed), sample index), as raw key data


def filter_mask(logits_BxV: jax.Array, row: RowSampling) -> jax.Array:
    """[B, V] True for the tokens that survive temperature + top-k + top-p + min-p (the best always does)."""
    V = logits_BxV.shape[-1]
    scaled_BxV = scaled_logits(logits_BxV, row.temperature_B)
    order_BxV = jnp.argsort(-scaled_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1)
    rank_V = jnp.arange(V)
    keep_BxV = rank_V[None, :] < jnp.minimum(row.top_k_B, V)[:, None]
    probs_BxV = jax.nn.softmax(jnp.where(keep_BxV, sorted_BxV, -jnp.inf), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV &= (mass_before_BxV < row.top_p_B[:, None]) | (row.top_p_B[:, None] >= 1.0)
    full_probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    keep_BxV &= full_probs_BxV >= row.min_p_B[:, None] * full_probs_BxV[:, :1]
    keep_BxV = keep_BxV.at[:, 0].set(True)
    # Back from rank order to vocabulary order.
    return jnp.zeros_like(keep_BxV).at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV].set(keep_BxV)


def scaled_logits(logits_BxV: jax.Array, temperature_B: jax.Array) -> jax.Array:
    """logits / temperature in float32 (temperature 0 leaves them as they are: greedy needs only the argmax)."""
    t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
    return logits_BxV.astype(jnp.float32) / t_B[:, None]


def sample(
    logits_BxV: jax.Array, row: RowSampling, step_B: jax.Array, *, logprobs: bool = True
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its logprob (zeros with logprobs=False); `step_B` counts the tokens the row has
    sampled so far.

    The vocabulary sort behind the filters costs more than a small model's decode step on a CPU, so it runs
    only when some row filters, and the random draw only when some row samples (both decided on device); the
    log_softmax over the vocabulary only when the caller wants logprobs."""
    V = logits_BxV.shape[-1]
    scaled_BxV = scaled_logits(logits_BxV, row.temperature_B)
    filters = jnp.any((row.top_k_B < V) | (row.top_p_B < 1.0) | (row.min_p_B > 0.0))
    sampling = jnp.any(row.temperature_B > 0)

    def draw(scaled_BxV):
        masked_BxV = jax.lax.cond(
            filters,
            lambda x: jnp.where(filter_mask(logits_BxV, row), x, -jnp.inf),
            lambda x: x,
            scaled_BxV,
        )
        keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(row.key_data_BxK), step_B)
        return jax.vmap(jax.random.categorical)(keys_B, masked_BxV).astype(jnp.int32)

    greedy_B = first_argmax(scaled_BxV)
    drawn_B = jax.lax.cond(sampling, draw, lambda x: greedy_B, scaled_BxV)
    token_B = jnp.where(row.temperature_B > 0, drawn_B, greedy_B)
    if not logprobs:
        return token_B, jnp.zeros(token_B.shape, jnp.float32)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return token_B, logprob_B


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """argmax over the last axis (the first index on ties) as two plain reductions: XLA:CPU runs jnp.argmax's
    variadic (value, index) reduce several times slower, which shows in a small model's decode step."""
    V = x_BxV.shape[-1]
    at_max_BxV = x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(at_max_BxV, jnp.arange(V, dtype=jnp.int32), V), axis=-1).astype(jnp.int32)


def row_sampling(params: list[SamplingParams], seeds: list[int], samples: list[int], vocab: int) -> RowSampling:
    """Device arrays for rows with the given params, seeds and sample indices (host lists of equal length)."""
    return RowSampling(
        temperature_B=jnp.asarray([p.temperature for p in params], jnp.float32),
        top_k_B=jnp.asarray([vocab if p.top_k == -1 else p.top_k for p in params], jnp.int32),
        top_p_B=jnp.asarray([p.top_p for p in params], jnp.float32),
        min_p_B=jnp.asarray([p.min_p for p in params], jnp.float32),
        key_data_BxK=_row_keys(np.asarray(seeds, np.uint32), np.asarray(samples, np.int32)),
    )


@jax.jit
def _row_keys(seeds_B, samples_B) -> jax.Array:
    """fold_in(key(seed), sample index) per row as raw key data, compiled: traced eagerly, the vmap cost several
    milliseconds of every generate call."""
    return jax.random.key_data(jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, samples_B))
