"""The GRPO objective with TRL's GRPOTrainer formulas, written so that micro-batches add up exactly.

Per completion token t of row i (paper symbols: G, mu = num_iterations, beta, epsilon; TRL names):

  log w   = logp - logp_old                              importance_sampling_level="token"
  log w_i = sum_t m_it (logp - logp_old) / max(|o_i|, 1)  "sequence" (GSPO): one weight per row
  c1 = exp(log w);  c2 = clip(c1, 1 - epsilon, 1 + epsilon_high);  c1 = min(c1, delta) if delta is set
  l_it = -min(c1 A_i, c2 A_i) + beta * KL_it,   KL_it = exp(logp_ref - logp) - (logp_ref - logp) - 1   (k3)

With mu = 1 the rollout's own log-probs are the old ones: `old_logps_BxT=None` uses stop_gradient(logp), so
w = 1 and the gradient is the plain policy gradient -A_i * dlogp (times the normalisation below).

Normalisation (m = completion mask, B_g / N_tok = rows / mask tokens of the whole optimizer step, all
micro-batches and all devices; L = max_completion_length; N_items = `LossNormalizer.num_items`):

  grpo     sum_i [ sum_t m_it l_it / max(|o_i|, 1) ] / B_g
  bnpo     sum_it m_it l_it / N_tok
  dr_grpo  sum_it m_it l_it / (B_g * L)
  dapo     sum_it m_it l_it / N_items

Each micro-batch returns its share with the global denominators, so the micro-batch losses (and gradients)
SUM to those of the whole step. How that maps onto TRL, which normalises per micro-batch (the HF Trainer's
own accumulation scaling is switched off; DDP averages gradients over processes):

  grpo, dr_grpo  TRL divides each micro-batch's mean by gradient_accumulation_steps: with equal micro-batches
                 (always so in TRL) that is exactly the formulas above.
  dapo           TRL divides the micro-batch sum by num_items_in_batch / num_processes, where
                 num_items_in_batch = completion tokens of the whole *generation* batch gathered from all
                 processes, counted BEFORE mask_truncated_completions zeroes truncated rows; it is not divided
                 by gradient_accumulation_steps. Pass that count as `num_items` to match TRL. It equals the
                 optimizer step's token count when steps_per_generation == gradient_accumulation_steps (TRL's
                 default) and no row is masked; with steps_per_generation > gradient_accumulation_steps TRL's
                 steps each see only their part of the generation batch, so its loss is correspondingly smaller.
  bnpo           TRL divides by the token count of the *local* micro-batch (its docs: "results may slightly
                 vary depending on the local batch size"). Ours uses the step's global count; the two agree
                 with one micro-batch on one process and differ otherwise (ours = the token mean of the step).

Clip metrics follow TRL: low = c1 < 1 - epsilon with A < 0, high = c1 > 1 + epsilon_high with A > 0,
region = either; token level counts masked tokens, sequence level counts rows (TRL's plain mean over rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from openr1_jax.errors import UserError

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """GRPO loss options, named and defaulted as TRL's GRPOConfig (hashable: pass it as a static argument)."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2  # epsilon_low: lower clip 1 - epsilon
    epsilon_high: float | None = None  # None = epsilon; DAPO recommends 0.28
    delta: float | None = None  # INTELLECT-2 two-sided clip: c1 <= delta; None = off
    beta: float = 0.0  # KL weight; 0 = no reference model
    max_completion_length: int = 256  # dr_grpo's constant

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}.")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise UserError(
                f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                f"got {self.importance_sampling_level!r}."
            )
        if self.epsilon < 0.0:
            raise UserError(f"epsilon must be >= 0, got {self.epsilon}.")
        if self.epsilon_high is not None and self.epsilon_high < 0.0:
            raise UserError(f"epsilon_high must be >= 0, got {self.epsilon_high}.")
        if self.delta is not None and self.delta <= 1.0:
            raise UserError(f"delta must be > 1 (TRL recommends > 1 + epsilon_high), got {self.delta}.")
        if self.beta < 0.0:
            raise UserError(f"beta must be >= 0, got {self.beta}.")
        if isinstance(self.max_completion_length, bool) or self.max_completion_length < 1:
            raise UserError(f"max_completion_length must be a positive integer, got {self.max_completion_length}.")

    @property
    def eps_low(self) -> float:
        return self.epsilon

    @property
    def eps_high(self) -> float:
        """The upper clip epsilon in force: epsilon_high, or epsilon when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class LossNormalizer(NamedTuple):
    """Denominators for the WHOLE optimizer step (all micro-batches, all devices); a pytree, so they trace.

    num_sequences: completion rows (fully masked rows included, as TRL's mean over rows).
    num_tokens:    completion-mask tokens (bnpo).
    num_items:     dapo's denominator, TRL's num_items_in_batch: completion tokens of the generation batch
                   counted before mask_truncated_completions (see the module docstring).
    """

    num_sequences: jax.Array | float
    num_tokens: jax.Array | float
    num_items: jax.Array | float

    @classmethod
    def from_mask(cls, mask_BxT, num_items=None) -> LossNormalizer:
        """Counts of a whole step's completion mask; `num_items` defaults to its token count."""
        mask = np.asarray(mask_BxT, np.float32)
        tokens = float(mask.sum())
        return cls(float(mask.shape[0]), tokens, tokens if num_items is None else float(num_items))


def token_logps(logits_BxTxV: jax.Array, targets_BxT: jax.Array, temperature: float = 1.0):
    """(log-prob of each target, entropy of the distribution), both of softmax(logits / temperature), float32.

    Position t of the logits predicts targets_BxT[:, t] (align before calling). TRL divides the logits by the
    sampling temperature before both, so the log-probs are those the sampler drew from."""
    if isinstance(temperature, int | float) and temperature <= 0:
        raise UserError(f"temperature must be > 0, got {temperature}.")
    if logits_BxTxV.ndim != 3 or targets_BxT.shape != logits_BxTxV.shape[:2]:
        raise UserError(f"logits {logits_BxTxV.shape} and targets {targets_BxT.shape} do not line up as [B, T, V].")
    logits = logits_BxTxV.astype(jnp.float32) / temperature
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    probs = jnp.exp(logits - lse_BxT[..., None])
    entropy_BxT = lse_BxT - (probs * logits).sum(-1)
    return target_BxT - lse_BxT, entropy_BxT


def kl_k3(logps_BxT: jax.Array, ref_logps_BxT: jax.Array) -> jax.Array:
    """Schulman's k3 estimate of KL(pi || pi_ref) per token: exp(r) - r - 1 with r = ref - logp (>= 0)."""
    r = ref_logps_BxT - logps_BxT
    return jnp.exp(r) - r - 1.0


def _check_shapes(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT):
    if logps_BxT.ndim != 2:
        raise UserError(f"logps must be [B, T], got shape {logps_BxT.shape}.")
    B, T = logps_BxT.shape
    for name, x in (("old_logps", old_logps_BxT), ("ref_logps", ref_logps_BxT), ("mask", mask_BxT)):
        if x is not None and x.shape != (B, T):
            raise UserError(f"{name} has shape {x.shape}, expected {(B, T)} like logps.")
    if advantages_B.shape != (B,):
        raise UserError(f"advantages has shape {advantages_B.shape}, expected {(B,)} (one per completion).")


def grpo_loss(
    logps_BxT: jax.Array,
    old_logps_BxT: jax.Array | None,
    ref_logps_BxT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    cfg: LossConfig,
    norm: LossNormalizer,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This micro-batch's share of the step loss, and masked SUMS for metrics (divide after summing them).

    stats: kl (sum of m * KL; 0 without a reference), low_clip / high_clip / region_clip (counts),
    clip_total (their denominator: tokens, or rows at sequence level), tokens, sequences."""
    _check_shapes(logps_BxT, old_logps_BxT, ref_logps_BxT, advantages_B, mask_BxT)
    if cfg.beta != 0.0 and ref_logps_BxT is None:
        raise UserError("beta > 0 needs reference log-probs (ref_logps); set beta=0 to train without a reference.")
    logps = logps_BxT.astype(jnp.float32)
    mask = mask_BxT.astype(jnp.float32)
    old = jax.lax.stop_gradient(logps) if old_logps_BxT is None else old_logps_BxT.astype(jnp.float32)
    adv_Bx1 = advantages_B.astype(jnp.float32)[:, None]
    lengths_B = mask.sum(-1)

    log_ratio_BxT = logps - old
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio_BxT  # [B, T]
        unit_mask = mask
    else:
        log_w = ((log_ratio_BxT * mask).sum(-1) / jnp.maximum(lengths_B, 1.0))[:, None]  # [B, 1]
        unit_mask = jnp.ones_like(log_w)
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    if cfg.delta is not None:
        coef_1 = jnp.minimum(coef_1, cfg.delta)
    per_token_BxT = jnp.broadcast_to(-jnp.minimum(coef_1 * adv_Bx1, coef_2 * adv_Bx1), logps.shape)

    kl_BxT = None if ref_logps_BxT is None else kl_k3(logps, ref_logps_BxT.astype(jnp.float32))
    if cfg.beta != 0.0:
        per_token_BxT = per_token_BxT + cfg.beta * kl_BxT

    masked_BxT = per_token_BxT * mask
    if cfg.loss_type == "grpo":
        loss = (masked_BxT.sum(-1) / jnp.maximum(lengths_B, 1.0)).sum() / jnp.maximum(norm.num_sequences, 1.0)
    elif cfg.loss_type == "bnpo":
        loss = masked_BxT.sum() / jnp.maximum(norm.num_tokens, 1.0)
    elif cfg.loss_type == "dr_grpo":
        loss = masked_BxT.sum() / (jnp.maximum(norm.num_sequences, 1.0) * cfg.max_completion_length)
    else:  # dapo
        loss = masked_BxT.sum() / jnp.maximum(norm.num_items, 1.0)

    low = (coef_1 < 1.0 - cfg.eps_low) & (adv_Bx1 < 0)
    high = (coef_1 > 1.0 + cfg.eps_high) & (adv_Bx1 > 0)
    stats = {
        "kl": jnp.zeros((), jnp.float32) if kl_BxT is None else jax.lax.stop_gradient((kl_BxT * mask).sum()),
        "low_clip": jax.lax.stop_gradient((low * unit_mask).sum()),
        "high_clip": jax.lax.stop_gradient((high * unit_mask).sum()),
        "region_clip": jax.lax.stop_gradient(((low | high) * unit_mask).sum()),
        "clip_total": unit_mask.sum(),
        "tokens": mask.sum(),
        "sequences": jnp.asarray(logps.shape[0], jnp.float32),
    }
    return loss, stats
