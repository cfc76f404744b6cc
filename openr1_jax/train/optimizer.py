"""AdamW with global-norm clipping and the learning-rate schedules of Hugging Face `transformers`.

Option names and semantics are the ones TRL / Open-R1 users set in their recipes (`learning_rate`,
`lr_scheduler_type`, `warmup_ratio`, `min_lr_rate`, `max_grad_norm`, ...), and the schedules reproduce
`transformers.get_scheduler` step for step: the optimizer update at step s uses the multiplier lambda(s),
starting at s = 0 (so with warmup the very first update has learning rate 0, exactly as the HF Trainer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from openr1_jax.errors import UserError

SchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"]


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate (after warmup)"})
    lr_scheduler_type: SchedulerType = field(
        default="cosine_with_min_lr",
        metadata={"help": "learning-rate schedule, as transformers' lr_scheduler_type"},
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of total steps of linear warmup from 0"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup steps; wins over warmup_ratio when > 0"})
    min_lr_rate: float = field(
        default=0.1, metadata={"help": "cosine_with_min_lr: final learning rate as a fraction of learning_rate"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay (not on 1-D params)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip gradients to this global norm (0 = off)"})

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate >= 0, "learning_rate must be >= 0"),
            (
                self.lr_scheduler_type in SchedulerType.__args__,
                f"lr_scheduler_type '{self.lr_scheduler_type}' is not one of {list(SchedulerType.__args__)}",
            ),
            (0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0.0 <= self.min_lr_rate <= 1.0, "min_lr_rate must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0.0 <= self.adam_beta1 < 1.0, "adam_beta1 must be in [0, 1)"),
            (0.0 <= self.adam_beta2 < 1.0, "adam_beta2 must be in [0, 1)"),
            (self.adam_epsilon > 0, "adam_epsilon must be > 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 turns clipping off)"),
            # transformers' "constant" silently ignores warmup; say so instead of surprising the user.
            (
                self.lr_scheduler_type != "constant" or (self.warmup_steps == 0 and self.warmup_ratio == 0),
                "lr_scheduler_type 'constant' has no warmup (as in transformers); use 'constant_with_warmup'",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid optimizer config: {message}")

    def num_warmup_steps(self, total_steps: int) -> int:
        """transformers' `TrainingArguments.get_warmup_steps`: explicit steps, else ceil(total * ratio)."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(total_steps * self.warmup_ratio)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """step -> learning rate, equal to `transformers.get_scheduler(cfg.lr_scheduler_type, ...)` at every step."""
    if total_steps <= 0:
        raise UserError(f"the number of training steps must be positive, got {total_steps}")
    kind = cfg.lr_scheduler_type
    warmup = cfg.num_warmup_steps(total_steps)
    peak = cfg.learning_rate
    decay_steps = max(1, total_steps - warmup)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(1, warmup)
        progress = (s - warmup) / decay_steps
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))  # num_cycles = 0.5
        if kind == "constant":
            return jnp.full_like(s, peak)
        if kind == "constant_with_warmup":
            after = jnp.ones_like(s)
        elif kind == "linear":
            after = jnp.maximum(0.0, (total_steps - s) / decay_steps)
        elif kind == "cosine":
            after = jnp.maximum(0.0, cosine)
        else:  # cosine_with_min_lr
            after = jnp.maximum(0.0, cosine * (1.0 - cfg.min_lr_rate) + cfg.min_lr_rate)
        return peak * jnp.where(s < warmup, warm, after)

    return schedule


def decay_mask(params) -> object:
    """True where weight decay applies: matrices only. 1-D params (norm scales, biases) are exempt, as the
    HF Trainer exempts `bias` and LayerNorm weights. Unknown leaves (no shape) count as matrices."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 2) > 1, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (before anything else, as torch's clip_grad_norm_), then AdamW on the schedule."""
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(cfg, total_steps),
        b1=cfg.adam_beta1,
        b2=cfg.adam_beta2,
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
