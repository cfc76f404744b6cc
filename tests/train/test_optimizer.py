"""Schedules, clipping and AdamW against transformers / torch, step for step."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from openr1_jax.errors import UserError
from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer

TOTAL = 23


def _hf_lrs(cfg: OptimizerConfig, total: int) -> np.ndarray:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    kwargs = {"min_lr_rate": cfg.min_lr_rate} if cfg.lr_scheduler_type == "cosine_with_min_lr" else {}
    sched = transformers.get_scheduler(
        cfg.lr_scheduler_type,
        opt,
        num_warmup_steps=cfg.num_warmup_steps(total),
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs,
    )
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return np.array(lrs)


WARMUPS = [{}, {"warmup_ratio": 0.2}, {"warmup_steps": 4, "warmup_ratio": 0.5}]
CASES = [("constant", {})] + [
    (kind, warmup) for kind in ("constant_with_warmup", "linear", "cosine", "cosine_with_min_lr") for warmup in WARMUPS
]


@pytest.mark.parametrize(("kind", "warmup"), CASES)
def test_schedule_matches_transformers(kind, warmup):
    cfg = OptimizerConfig(learning_rate=3e-4, lr_scheduler_type=kind, min_lr_rate=0.1, **warmup)
    ours = np.asarray(learning_rate_schedule(cfg, TOTAL)(jnp.arange(TOTAL)))
    np.testing.assert_allclose(ours, _hf_lrs(cfg, TOTAL), rtol=1e-5, atol=1e-12)


def test_warmup_steps_win_over_ratio():
    assert OptimizerConfig(warmup_ratio=0.1).num_warmup_steps(25) == 3  # ceil(2.5), as transformers
    assert OptimizerConfig(warmup_ratio=0.1, warmup_steps=7).num_warmup_steps(25) == 7


def test_config_validation():
    with pytest.raises(UserError, match="lr_scheduler_type"):
        OptimizerConfig(lr_scheduler_type="polynomial")
    with pytest.raises(UserError, match="constant_with_warmup"):
        OptimizerConfig(lr_scheduler_type="constant", warmup_ratio=0.1)
    with pytest.raises(UserError, match="max_grad_norm"):
        OptimizerConfig(max_grad_norm=-1.0)
    with pytest.raises(UserError, match="training steps"):
        learning_rate_schedule(OptimizerConfig(), 0)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_clipping_and_adamw_match_torch(max_grad_norm):
    """Three steps of clip_grad_norm_ + AdamW (decay on matrices only) + HF schedule, against ours."""
    cfg = OptimizerConfig(
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.1, max_grad_norm=max_grad_norm
    )
    total = 4
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    # Step norms 10 (clipped), 0.5 (not clipped), 3 (clipped): Adam's moments see the clipped sizes.
    grads = []
    for norm in (10.0, 0.5, 3.0):
        g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        scale = norm / float(optax.global_norm(g))
        grads.append({k: v * scale for k, v in g.items()})

    tx = make_optimizer(cfg, total)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(ours)
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, ours)
        ours = optax.apply_updates(ours, updates)

    w, b = (torch.nn.Parameter(torch.tensor(params[k])) for k in ("w", "b"))
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": cfg.weight_decay}, {"params": [b], "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=total)
    for g in grads:
        w.grad, b.grad = torch.tensor(g["w"]), torch.tensor(g["b"])
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([w, b], max_grad_norm)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(ours["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours["b"]), b.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(ours["w"]), params["w"])  # something happened
