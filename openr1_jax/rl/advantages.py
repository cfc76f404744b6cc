"""Group-relative advantages, computed on the host in numpy, with TRL's GRPOTrainer semantics.

Rows come in groups of G = `num_generations` consecutive completions of one prompt (row n belongs to
group n // G). With F reward functions and weights w_F:

  r_n   = nansum_f w_f * R_nf           a NaN reward (the function returned None) is skipped, as in TRL;
                                        a row where every function returned None gets r_n = 0
  mu_n  = mean of r over n's group      (always per group, also for scale_rewards="batch")
  A_n   = r_n - mu_n                    scale_rewards="none"   (Dr. GRPO)
  A_n   = (r_n - mu_n) / (s_n + 1e-4)   "group": s_n = std of n's group; "batch": s_n = std of all N rewards

Standard deviations are unbiased (ddof 1), like torch.Tensor.std; a group of one has std 0, as TRL's eval
path. `std_zero_N` is TRL's `is_std_zero` (torch.isclose(std, 0)); its mean is the logged
`frac_reward_zero_std`. "batch" means the batch passed in: TRL gathers the whole generation batch from all
processes before normalising, so pass the global batch here. Computed in float64, returned as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openr1_jax.errors import UserError

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4


@dataclass(frozen=True)
class Advantages:
    """Per-row results; the group statistics are repeated over the G rows of each group."""

    advantages_N: np.ndarray  # float32
    rewards_N: np.ndarray  # float32, the weighted total reward r_n
    group_mean_N: np.ndarray  # float32
    group_std_N: np.ndarray  # float32, the std used for scaling ("batch": the batch std; "none": group std)
    std_zero_N: np.ndarray  # bool


def scale_rewards_mode(scale_rewards: str | bool) -> str:
    """TRL accepts True/False for "group"/"none"; anything else must be one of SCALE_REWARDS."""
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise UserError(
            f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true/false), got {scale_rewards!r}."
        )
    return scale_rewards


def _unbiased_std(x: np.ndarray, axis: int | None) -> np.ndarray:
    n = x.size if axis is None else x.shape[axis]
    if n < 2:
        return np.zeros(() if axis is None else x.shape[:axis] + x.shape[axis + 1 :], np.float64)
    return x.std(axis=axis, ddof=1)


def group_advantages(rewards_NxF, weights_F, num_generations: int, scale_rewards: str | bool = "group") -> Advantages:
    """Advantages for N = P * G completions from an [N, F] reward table (NaN or None = could not score)."""
    mode = scale_rewards_mode(scale_rewards)
    if isinstance(num_generations, bool) or not isinstance(num_generations, int | np.integer) or num_generations < 1:
        raise UserError(f"num_generations must be a positive integer, got {num_generations!r}.")
    try:
        rewards = np.asarray(rewards_NxF, dtype=np.float64)
        weights = np.asarray(weights_F, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"rewards and reward weights must be numbers (None for a missing reward): {e}.") from None
    if rewards.ndim != 2:
        raise UserError(f"rewards must be a [completions, reward functions] table, got shape {rewards.shape}.")
    N, F = rewards.shape
    if weights.shape != (F,):
        raise UserError(f"reward_weights has {weights.size} entries for {F} reward functions.")
    if N == 0 or F == 0:
        raise UserError(f"cannot compute advantages for an empty reward table of shape {rewards.shape}.")
    if N % num_generations:
        raise UserError(f"{N} completions do not split into groups of num_generations={num_generations}.")
    if not np.isfinite(weights).all():
        raise UserError(f"reward_weights must be finite, got {weights.tolist()}.")
    bad = np.isinf(rewards)
    if bad.any():
        n, f = np.argwhere(bad)[0]
        raise UserError(f"reward function {f} returned an infinite reward for completion {n}; return None to skip.")

    total_N = np.nansum(rewards * weights, axis=1)
    grouped_PxG = total_N.reshape(-1, num_generations)
    # Statistics of values shifted by their group's first value: the same numbers, but a group of equal
    # rewards gets exactly its value as mean and exactly 0 as advantage (sum / G is not exact in floats).
    first_PxG = grouped_PxG[:, :1]
    mean_N = np.repeat((first_PxG + (grouped_PxG - first_PxG).mean(axis=1, keepdims=True))[:, 0], num_generations)
    if mode == "batch":
        std_N = np.full(N, _unbiased_std(total_N - total_N[0], axis=None))
    else:  # "none" still reports the group std, as TRL logs it
        std_N = np.repeat(_unbiased_std(grouped_PxG - first_PxG, axis=1), num_generations)
    advantages_N = total_N - mean_N
    if mode != "none":
        advantages_N = advantages_N / (std_N + STD_EPS)
    f32 = np.float32
    return Advantages(
        advantages_N=advantages_N.astype(f32),
        rewards_N=total_N.astype(f32),
        group_mean_N=mean_N.astype(f32),
        group_std_N=std_N.astype(f32),
        std_zero_N=np.isclose(std_N, 0.0),
    )
