"""The SFT loss: hand-computed values, the target rule, packing, loss masking, MTP weighting, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from openr1_jax.train.loss import (
    sft_loss,
    shifted_targets,
    token_counts,
    token_cross_entropy,
    weighted_ce_sum,
)

T = 20


@nnx.jit
def _forward(model, batch):
    return model(batch["input_ids"], batch["positions"], batch["segment_ids"])


_loss = nnx.jit(sft_loss, static_argnames=("mtp_loss_weight", "seq_aux_loss_alpha"))


def _row(examples, T=T):
    """Pack [(ids, mask)] into one row: input_ids, segment_ids, positions, loss_mask (padding after)."""
    ids, seg, pos, mask = (np.zeros(T, np.int32) for _ in range(4))
    start = 0
    for s, (e_ids, e_mask) in enumerate(examples, start=1):
        n = len(e_ids)
        ids[start : start + n], mask[start : start + n] = e_ids, e_mask
        seg[start : start + n], pos[start : start + n] = s, np.arange(n)
        start += n
    return ids, seg, pos, mask


def _batch(rows):
    cols = list(zip(*rows))
    return {k: np.stack(c) for k, c in zip(("input_ids", "segment_ids", "positions", "loss_mask"), cols)}


@pytest.fixture(scope="module")
def model():
    # Two MTP depths so that lambda / D is not lambda.
    cfg = load_model_config("tiny-moe", {"num_nextn_predict_layers": 2})
    return build_model(cfg, seed=1)


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    out = []
    for n, prompt in ((6, 2), (8, 3), (4, 1)):
        ids = rng.integers(1, 512, n).astype(np.int32)
        mask = (np.arange(n) >= prompt).astype(np.int32)  # prompt tokens are not trained
        out.append((ids, mask))
    return out


def test_token_cross_entropy_hand_computed():
    logits = np.array([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]], np.float32)
    targets = np.array([[1, 0]], np.int32)
    expected = [np.log(np.exp(row).sum()) - row[t] for row, t in zip(logits[0], targets[0])]
    np.testing.assert_allclose(token_cross_entropy(logits, targets)[0], expected, rtol=1e-6)


def test_shifted_targets_follow_the_batch_rule():
    # Row: segment 1 = tokens 10 11 12 (prompt 10), segment 2 = 20 21 (prompt 20), then padding.
    batch = _batch([_row([([10, 11, 12], [0, 1, 1]), ([20, 21], [0, 1])], T=7)])
    targets, weights = shifted_targets(batch, 1)
    np.testing.assert_array_equal(targets[0], [11, 12, 20, 21, 0, 0, 0])
    # 10->11, 11->12 trained; 12->20 crosses a boundary; 20->21 trained; 21->pad crosses; pad never.
    np.testing.assert_array_equal(weights[0], [1, 1, 0, 1, 0, 0, 0])
    targets2, weights2 = shifted_targets(batch, 2)
    np.testing.assert_array_equal(targets2[0], [12, 20, 21, 0, 0, 0, 0])
    np.testing.assert_array_equal(weights2[0], [1, 0, 0, 0, 0, 0, 0])
    assert weights.dtype == jnp.float32 and targets.dtype == jnp.int32
    np.testing.assert_array_equal(token_counts(batch, 3), [3, 1, 0])
    # Past the row end a depth has no target at all.
    _, weights_far = shifted_targets(batch, 9)
    assert float(weights_far.sum()) == 0


def test_main_loss_hand_computed():
    batch = _batch([_row([([1, 2, 3], [0, 1, 1]), ([0, 2], [1, 1])], T=6)])
    logits = np.random.default_rng(1).normal(size=(1, 6, 4)).astype(np.float32)
    ce_sum, count = weighted_ce_sum(logits, batch, 1)
    logp = logits[0] - np.log(np.exp(logits[0]).sum(-1, keepdims=True))
    # Trained (position -> target): 0->2, 1->3, 3->2.
    expected = -(logp[0, 2] + logp[1, 3] + logp[3, 2])
    assert float(count) == 3
    np.testing.assert_allclose(float(ce_sum), expected, rtol=1e-6)


def test_loss_gradient_is_zero_at_prompt_targets(examples):
    batch = _batch([_row(examples)])
    logits = jax.random.normal(jax.random.key(0), (1, T, 512))

    def mean_loss(lg, b):
        s, n = weighted_ce_sum(lg, b, 1)
        return s / n

    grad = jax.grad(mean_loss)(logits, batch)
    _, weights = shifted_targets(batch, 1)
    row_norm = np.abs(np.asarray(grad[0])).sum(-1)
    trained = np.asarray(weights[0]) > 0
    assert np.all(row_norm[~trained] == 0.0)  # exactly zero: prompt targets, boundaries, padding
    assert np.all(row_norm[trained] > 0.0)
    # Changing the ids of prompt targets (never of a trained token) leaves the loss unchanged.
    changed = {k: v.copy() for k, v in batch.items()}
    prompt_tokens = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
    changed["input_ids"] = np.where(prompt_tokens, 7, batch["input_ids"]).astype(np.int32)
    assert (changed["input_ids"] != batch["input_ids"]).any()
    assert float(mean_loss(logits, changed)) == float(mean_loss(logits, batch))


def test_packed_row_equals_examples_alone(model, examples):
    # Row 0: the three examples packed; rows 1-3: each example alone. One forward for all.
    batch = _batch([_row(examples)] + [_row([e]) for e in examples])
    out = _forward(model, batch)
    assert len(out.mtp_logits) == 2
    for depth, logits in enumerate((out.logits, *out.mtp_logits), start=1):
        targets, weights = shifted_targets(batch, depth)
        ce = np.asarray(token_cross_entropy(logits, targets) * weights)
        start = 0
        for row, (ids, _) in enumerate(examples, start=1):
            n = len(ids)
            np.testing.assert_allclose(ce[0, start : start + n], ce[row, :n], atol=1e-5, err_msg=f"depth {depth}")
            start += n
        np.testing.assert_allclose(ce[0].sum(), ce[1:].sum(), atol=1e-5)
        assert np.asarray(weights[0]).sum() == np.asarray(weights[1:]).sum() > 0


def test_mtp_and_balance_weighting(model, examples):
    batch = _batch([_row(examples), _row(examples[::-1])])
    lam, alpha = 0.3, 0.01
    loss, aux = _loss(model, batch, mtp_loss_weight=lam, seq_aux_loss_alpha=alpha)
    out = _forward(model, batch)
    per_head = []
    for depth, logits in enumerate((out.logits, *out.mtp_logits), start=1):
        s, n = weighted_ce_sum(logits, batch, depth)
        np.testing.assert_allclose(aux["ce_sum"][depth - 1], s, rtol=1e-6)  # unnormalised sums in aux
        assert aux["num_tokens"][depth - 1] == n
        per_head.append(float(s / n))  # each head over its own token count
    main, mtp = per_head[0], per_head[1:]
    np.testing.assert_allclose(float(aux["main_loss"]), main, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["mtp_losses"]), mtp, rtol=1e-6)
    # Every MoE layer reported, the MTP blocks' included: layers 1, 2 and both MTP blocks.
    assert sorted(aux["moe"]) == ["layers.1.mlp", "layers.2.mlp", "mtp.0.block.mlp", "mtp.1.block.mlp"]
    balance = np.mean([float(s["balance_loss"]) for s in aux["moe"].values()])
    for s in aux["moe"].values():  # every non-padding token sends K = 2 assignments; padding counts nowhere
        assert float(s["expert_load"].sum()) == 2 * int((np.asarray(batch["segment_ids"]) != 0).sum())
    np.testing.assert_allclose(float(aux["balance_loss"]), balance, rtol=1e-6)
    expected = main + lam / 2 * sum(mtp) + alpha * balance
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(aux["loss"]), expected, rtol=1e-6)
    # Weight 0 skips the MTP heads altogether.
    loss0, aux0 = _loss(model, batch, mtp_loss_weight=0.0, seq_aux_loss_alpha=0.0)
    assert aux0["mtp_losses"].shape == (0,)
    np.testing.assert_allclose(float(loss0), main, rtol=1e-6)


def test_loss_is_float32_with_bf16_compute(model, examples):
    batch = _batch([_row(examples), _row(examples[::-1])])
    model_bf16 = build_model(model.config, dtype="bfloat16", seed=1)  # same weights, bf16 activations
    losses = {}
    for name, m in (("float32", model), ("bfloat16", model_bf16)):
        loss, aux = _loss(m, batch, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
        assert loss.dtype == jnp.float32 and aux["ce_sum"].dtype == jnp.float32
        losses[name] = float(loss)
    assert model_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
