"""The GRPO train step `(state, batch) -> (state, metrics)` and the log-probs the loss is built from.

A batch holds whole sequences `prompt + completion + padding` ([B, T], T = max_prompt_length +
max_completion_length) and per-*target* arrays: position t of `mask`, `old_logps` and `ref_logps` describes
the token at t + 1, the one the logits at t predict. So the trainer's log-prob of a rollout token is
`log_softmax(logits[t] / temperature)[input_ids[t + 1]]`, the same quantity the sampler returned for it.

Accumulation is exact, as in SFT: the normalisers (sequences, completion tokens, DAPO's token count) are
counted over the whole step before the first micro-batch, so micro-batch losses and gradients just add up.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openr1_jax.rl.loss import LossConfig, LossNormalizer, grpo_loss, token_logps
from openr1_jax.sharding.context import constrain
from openr1_jax.train.loss import EXPERT_LOAD, moe_statistics
from openr1_jax.train.state import TrainState, merge_model
from openr1_jax.train.step import expert_load_metrics, per_micro_batch, update_router_biases

Batch = dict[str, jax.Array]
BATCH_KEYS = ("input_ids", "valid", "mask", "old_logps", "ref_logps", "advantages")


def sequence_logps(model: nnx.Module, input_ids_BxT: jax.Array, valid_BxT: jax.Array, temperature: float):
    """(logps_BxT, entropy_BxT, moe stats): log-prob of token t + 1 under logits[t] / temperature, the entropy
    of that distribution, and the routers' load statistics (padding excluded)."""
    out, intermediates = nnx.capture(
        lambda m: m(input_ids_BxT, with_mtp=False, token_mask=valid_BxT != 0), nnx.Intermediate
    )(model)
    targets_BxT = jnp.concatenate([input_ids_BxT[:, 1:], jnp.zeros_like(input_ids_BxT[:, :1])], axis=1)
    logps_BxT, entropy_BxT = token_logps(out.logits, targets_BxT, temperature)
    return logps_BxT, entropy_BxT, moe_statistics(intermediates)


def make_logps_fn(graphdef: nnx.GraphDef, temperature: float) -> Callable:
    """Jittable `(params, buffers, input_ids, valid) -> logps_BxT` (the reference model's, or the sampler check's)."""

    def logps(params, buffers, input_ids_BxT, valid_BxT):
        return sequence_logps(merge_model(graphdef, params, buffers), input_ids_BxT, valid_BxT, temperature)[0]

    return logps


def make_grpo_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    loss_cfg: LossConfig,
    *,
    temperature: float,
    micro_batches: int,
    on_policy: bool,
    schedule: optax.Schedule,
    bias_update_rate: float = 0.0,
):
    """The pure step. `on_policy` (one pass over a generation that feeds one optimizer step, TRL's condition):
    the old log-probs are the current ones detached, so the ratio is exactly 1; otherwise the rollout's."""
    k = micro_batches

    def loss_fn(params, buffers, mb: Batch, norm: LossNormalizer):
        model = merge_model(graphdef, params, buffers)
        logps_BxT, entropy_BxT, moe = sequence_logps(model, mb["input_ids"], mb["valid"], temperature)
        old = None if on_policy else mb["old_logps"]
        ref = mb["ref_logps"] if loss_cfg.beta > 0 else None
        loss, stats = grpo_loss(logps_BxT, old, ref, mb["advantages"], mb["mask"], loss_cfg, norm)
        stats = {**stats, "entropy": (entropy_BxT * mb["mask"]).sum()}
        loads = {module: s[EXPERT_LOAD] for module, s in moe.items() if EXPERT_LOAD in s}
        return loss, (stats, loads)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {name: jnp.asarray(batch[name]) for name in (*BATCH_KEYS, "num_items")}
        B = batch["input_ids"].shape[0]
        mask_BxT = batch["mask"]
        norm = LossNormalizer(
            num_sequences=jnp.asarray(B, jnp.float32),
            num_tokens=mask_BxT.sum(),
            num_items=batch.pop("num_items").astype(jnp.float32),
        )
        # Micro-batch j takes rows j, j + k, ... so every micro-batch stays spread over the data axes.
        micro = {
            name: constrain(x.reshape(B // k, k, *x.shape[1:]).swapaxes(0, 1), (None, "batch") + (None,) * (x.ndim - 1))
            for name, x in batch.items()
        }

        def accumulate(grads_sum, mb):
            params, mb = per_micro_batch(state.params, mb)
            (loss, aux), grads = grad_fn(params, state.buffers, mb, norm)
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
            return grads_sum, (loss, aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, (losses, (stats, loads)) = jax.lax.scan(accumulate, zeros, micro)
        stats = jax.tree.map(lambda x: x.sum(0), stats)
        loads = jax.tree.map(lambda x: x.sum(0), loads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        buffers = (
            update_router_biases(state.buffers, loads, bias_update_rate) if bias_update_rate > 0 else state.buffers
        )

        tokens = jnp.maximum(stats["tokens"], 1.0)
        clipped = jnp.maximum(stats["clip_total"], 1.0)  # tokens (token level) or rows (sequence level)
        metrics = {
            "loss": losses.sum(),
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "entropy": stats["entropy"] / tokens,
            "clip_ratio/low_mean": stats["low_clip"] / clipped,
            "clip_ratio/high_mean": stats["high_clip"] / clipped,
            "clip_ratio/region_mean": stats["region_clip"] / clipped,
            "num_tokens": stats["tokens"],
        }
        if loss_cfg.beta > 0:
            metrics["kl"] = stats["kl"] / tokens
        metrics.update(expert_load_metrics(loads))
        new_state = TrainState(
            step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state, rng=jax.random.split(state.rng)[0]
        )
        return new_state, metrics

    return step
