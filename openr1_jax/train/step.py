"""The pure SFT train step `(state, batch) -> (state, metrics)`: gradient accumulation, AdamW and
DeepSeek-V3's auxiliary-loss-free load balancing.

Accumulation is exact: the weighted-token counts of the whole global batch are known before any forward
pass (they depend only on the batch), so each micro-batch's token-CE sums are divided by the *global*
counts and the micro-batch gradients simply add up; k micro-batches give one big batch's update.

Load balancing (V3 report, section 2.1.2): after the optimizer update every MoE router's correction bias
moves by `rate * sign(mean(load) - load)` (overloaded experts down, underloaded up), with the load counted
over the whole global batch. The bias lives in `state.buffers`, so the optimizer never sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openr1_jax.errors import UserError
from openr1_jax.sharding.context import constrain
from openr1_jax.train.loss import EXPERT_LOAD, sft_loss, token_counts
from openr1_jax.train.state import TrainState, merge_model

ROUTER_BIAS_SUFFIX = ".router.e_score_correction_bias"
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # V3's gamma for the first 14.3T tokens


@dataclass(frozen=True)
class StepConfig:
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step (the batch is split into this many)"}
    )
    mtp_loss_weight: float = field(
        default=0.3, metadata={"help": "lambda of the MTP loss (DeepSeek-V3: 0.3, later 0.1); 0 skips MTP"}
    )
    seq_aux_loss_alpha: float = field(
        default=0.0, metadata={"help": "alpha of the sequence-wise balance loss (DeepSeek-V3: 1e-4)"}
    )
    bias_update_rate: float | None = field(
        default=None,
        metadata={"help": "router correction-bias speed gamma; None = 0.001 if the model has the bias, else 0"},
    )

    def __post_init__(self) -> None:
        checks = [
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.mtp_loss_weight >= 0, "mtp_loss_weight must be >= 0"),
            (self.seq_aux_loss_alpha >= 0, "seq_aux_loss_alpha must be >= 0"),
            (self.bias_update_rate is None or self.bias_update_rate >= 0, "bias_update_rate must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid step config: {message}")


Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, cfg: StepConfig, schedule: optax.Schedule
) -> StepFn:
    k = cfg.gradient_accumulation_steps

    def loss_fn(params, buffers, micro_batch, counts):
        model = merge_model(graphdef, params, buffers)
        return sft_loss(
            model,
            micro_batch,
            mtp_loss_weight=cfg.mtp_loss_weight,
            seq_aux_loss_alpha=cfg.seq_aux_loss_alpha,
            global_token_counts=counts,
            balance_scale=1.0 / k,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = {name: jnp.asarray(batch[name]) for name in ("input_ids", "segment_ids", "positions", "loss_mask")}
        B = batch["input_ids"].shape[0]
        if B % k:
            raise UserError(f"batch size {B} is not divisible by gradient_accumulation_steps ({k})")
        num_heads = 1 + (_num_mtp_modules(graphdef, state) if cfg.mtp_loss_weight > 0 else 0)
        counts = token_counts(batch, num_heads)

        # Micro-batch j takes rows j, j + k, ...: a batch sharded over devices by rows stays evenly spread
        # (the constraint, a no-op outside a sharding context, keeps every micro-batch on all devices).
        micro_batches = {
            name: constrain(x.reshape(B // k, k, *x.shape[1:]).swapaxes(0, 1), (None, "batch", None))
            for name, x in batch.items()
        }

        def accumulate(grads_sum, micro_batch):
            params, micro_batch = per_micro_batch(state.params, micro_batch)
            (_, aux), grads = grad_fn(params, state.buffers, micro_batch, counts)
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
            return grads_sum, aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, aux_per_micro = jax.lax.scan(accumulate, zeros, micro_batches)
        aux = jax.tree.map(lambda x: x.sum(0), aux_per_micro)  # every aux value is additive (see sft_loss)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loads = {module: s[EXPERT_LOAD] for module, s in aux["moe"].items() if EXPERT_LOAD in s}
        buffers = update_router_biases(state.buffers, loads, cfg.bias_update_rate)

        metrics = {
            "loss": aux["loss"],
            "main_loss": aux["main_loss"],
            "balance_loss": aux["balance_loss"],
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "num_tokens": counts[0],
        }
        for depth, mtp_loss in enumerate(aux["mtp_losses"], start=1):
            metrics[f"mtp_loss_{depth}"] = mtp_loss
        metrics.update(expert_load_metrics(loads))

        new_state = TrainState(
            step=state.step + 1,
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=jax.random.split(state.rng)[0],
        )
        return new_state, metrics

    return step


def _num_mtp_modules(graphdef: nnx.GraphDef, state: TrainState) -> int:
    """MTP depth D of the model (0 for models without MTP); merging only reads structure, no compute."""
    model = merge_model(graphdef, state.params, state.buffers)
    return len(getattr(model, "mtp", ()))


def update_router_biases(buffers: dict[str, Any], loads: dict[str, jax.Array], rate: float | None) -> dict[str, Any]:
    """bias += rate * sign(mean(load) - load) for every router whose MoE module reported a load.

    `loads` is keyed by MoE module path ("layers.1.mlp"); the bias sits at "<path>.router.e_score_correction_bias".
    Scanned layers report one load per layer ([L, E] at "layer_stacks.1.mlp") for their stacked [L, E] bias.
    rate None means the V3 default (0.001) for models that have the bias."""

    def update(path, bias):
        name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        module = name.removesuffix(ROUTER_BIAS_SUFFIX)
        if module == name or module not in loads:
            return bias
        load_E = loads[module]
        step_size = DEFAULT_BIAS_UPDATE_RATE if rate is None else rate
        delta_E = step_size * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)
        return (bias.astype(jnp.float32) + delta_E).astype(bias.dtype)

    return jax.tree_util.tree_map_with_path(update, buffers)


def per_micro_batch(params, micro_batch):
    """Tie the parameters to the micro-batch (an identity) so the parameters' uses are not loop-invariant: XLA
    would otherwise hoist FSDP's per-layer all-gathers out of the accumulation loop and hold every layer's
    gathered weights at once (a whole bf16 model per chip; seen in `openr1-jax plan`). Gathered per layer per
    micro-batch, as FSDP means them to be."""
    return jax.lax.optimization_barrier((params, micro_batch))


def expert_load_metrics(loads: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Load imbalance averaged over MoE layers: max/mean (1 = perfectly balanced) and std/mean."""
    if not loads:
        return {}
    load_LxE = jnp.concatenate([load.reshape(-1, load.shape[-1]) for load in loads.values()]).astype(jnp.float32)
    mean_L = jnp.maximum(load_LxE.mean(-1), 1e-9)
    return {
        "expert_load_max_over_mean": (load_LxE.max(-1) / mean_L).mean(),
        "expert_load_cv": (load_LxE.std(-1) / mean_L).mean(),
    }


def jit_train_step(step_fn: StepFn, state_shardings: TrainState | None = None, batch_sharding=None) -> StepFn:
    """jax.jit with the state donated; shardings None = default placement. Metrics come back replicated."""
    if state_shardings is None and batch_sharding is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    mesh = getattr(state_shardings.step, "mesh", None) if state_shardings is not None else None
    metrics_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=(0,),
    )
