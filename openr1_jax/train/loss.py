"""The SFT objective: next-token cross-entropy on trained tokens, DeepSeek-V3's MTP loss and its
sequence-wise balance loss, all in float32 whatever the compute dtype.

Targets come from the batch itself (see the batch format in the design notes): at prediction depth d
(d = 1 main head, d = 1 + k for MTP depth k) position i predicts input_ids[i + d] with weight
loss_mask[i + d] * (segment_ids[i + d] == segment_ids[i] != 0), and 0 past the row end. Packed examples
therefore never predict across a boundary, and prompt tokens are never targets.

  L      = sum_i w_i CE_i / sum_i w_i                     (main head, over the whole global batch)
  L_MTP  = lambda / D * sum_k L^k                         (V3 report, eq. 25; each L^k over its own tokens)
  L_Bal  = alpha * mean over MoE layers of sum_i f_i P_i  (V3 report, eq. 17-20; sown by models/moe.py)

Everything a gradient-accumulation loop needs is returned unnormalised (token CE sums, token counts), and
`sft_loss` accepts the global token counts, so k micro-batches give exactly one big batch's gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Batch = dict[str, jax.Array]

EXPERT_LOAD = "expert_load"
BALANCE_LOSS = "balance_loss"


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, in float32 (logsumexp - logit[target])."""
    logits = logits_BxTxV.astype(jnp.float32)
    target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit_BxT


def shifted_targets(batch: Batch, depth: int) -> tuple[jax.Array, jax.Array]:
    """(targets int32 [B, T], weights float32 [B, T]) for prediction depth `depth` >= 1 (1 = next token)."""
    ids, segments, mask = (jnp.asarray(batch[k]) for k in ("input_ids", "segment_ids", "loss_mask"))
    B, T = ids.shape
    d = min(depth, T)

    def shift(x_BxT):
        return jnp.concatenate([x_BxT[:, d:], jnp.zeros((B, d), x_BxT.dtype)], axis=1)

    same_segment = (shift(segments) == segments) & (segments != 0)
    weights_BxT = jnp.where(same_segment & (shift(mask) != 0), 1.0, 0.0).astype(jnp.float32)
    return shift(ids).astype(jnp.int32), weights_BxT


def token_counts(batch: Batch, num_depths: int) -> jax.Array:
    """Weighted target tokens per depth, float32 [num_depths] (depth 1 first)."""
    return jnp.stack([shifted_targets(batch, d)[1].sum() for d in range(1, num_depths + 1)])


def weighted_ce_sum(logits_BxTxV: jax.Array, batch: Batch, depth: int) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token CE, number of weighted tokens) for one prediction head."""
    targets_BxT, weights_BxT = shifted_targets(batch, depth)
    return (token_cross_entropy(logits_BxTxV, targets_BxT) * weights_BxT).sum(), weights_BxT.sum()


def moe_statistics(intermediates: nnx.State) -> dict[str, dict[str, jax.Array]]:
    """{MoE module path ("layers.1.mlp"): {"expert_load": [E], "balance_loss": scalar}} from sown values.

    A module called several times contributes the sum of its loads and the mean of its balance losses. A stack of
    scanned layers ("layer_stacks.1.mlp") has one row per layer: expert_load [L, E], balance_loss [L]."""
    stats: dict[str, dict[str, jax.Array]] = {}
    for path, var in nnx.to_flat_state(intermediates):
        name = str(path[-1])
        if name not in (EXPERT_LOAD, BALANCE_LOSS):
            continue
        values = var.get_value() if hasattr(var, "get_value") else var.value
        values = values if isinstance(values, tuple) else (values,)
        stacked = jnp.stack([jnp.asarray(v, jnp.float32) for v in values])
        module = ".".join(str(p) for p in path[:-1])
        stats.setdefault(module, {})[name] = stacked.sum(0) if name == EXPERT_LOAD else stacked.mean(0)
    return stats


def sft_loss(
    model: nnx.Module,
    batch: Batch,
    *,
    mtp_loss_weight: float,
    seq_aux_loss_alpha: float,
    global_token_counts: jax.Array | None = None,
    balance_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, Any]]:
    """(loss to differentiate, aux) for one (micro-)batch.

    `global_token_counts` [1 + D] are the normalisers per depth; None = this batch's own counts. A gradient-
    accumulation loop passes the global batch's counts and `balance_scale` = 1 / micro-batches: then every
    float in aux except `ce_sum`/`num_tokens` (which are raw sums anyway) adds up over micro-batches to the
    global value, and so does the loss and its gradient.

    aux: loss, main_loss, mtp_losses [D] (each L^k), balance_loss (mean over MoE layers, without alpha),
    ce_sum [1 + D] and num_tokens [1 + D] (unnormalised), moe {module path: {expert_load, balance_loss}}.
    """
    with_mtp = mtp_loss_weight > 0
    out, intermediates = nnx.capture(
        lambda m: m(
            batch["input_ids"],
            batch["positions"],
            batch["segment_ids"],
            with_mtp=with_mtp,
            token_mask=batch["segment_ids"] != 0,  # padding does not count in the experts' load
        ),
        nnx.Intermediate,
    )(model)
    heads = (out.logits, *out.mtp_logits)
    sums = [weighted_ce_sum(logits, batch, depth) for depth, logits in enumerate(heads, start=1)]
    ce_sum = jnp.stack([s for s, _ in sums])
    num_tokens = jnp.stack([n for _, n in sums])
    normalisers = num_tokens if global_token_counts is None else jnp.asarray(global_token_counts, jnp.float32)
    # An empty head (e.g. no trained token at that depth) contributes 0, not NaN.
    per_head = ce_sum / jnp.maximum(normalisers, 1.0)
    main_loss, mtp_losses = per_head[0], per_head[1:]

    loss = main_loss
    if mtp_losses.size:
        loss = loss + mtp_loss_weight / mtp_losses.size * mtp_losses.sum()

    moe = moe_statistics(intermediates)
    balances = [s[BALANCE_LOSS] for s in moe.values() if BALANCE_LOSS in s]
    balance_loss = (
        jnp.mean(jnp.concatenate([b.ravel() for b in balances])) * balance_scale
        if balances
        else jnp.zeros((), jnp.float32)
    )
    if seq_aux_loss_alpha > 0:
        loss = loss + seq_aux_loss_alpha * balance_loss

    aux = {
        "loss": loss,
        "main_loss": main_loss,
        "mtp_losses": mtp_losses,
        "balance_loss": balance_loss,
        "ce_sum": ce_sum,
        "num_tokens": num_tokens,
        "moe": moe,
    }
    return loss, aux
