"""The pure train step: exact gradient accumulation, router-bias updates outside the optimizer, sharded ==
unsharded, overfitting a fixed batch; and the FLOPs count used for MFU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from openr1_jax.errors import UserError
from openr1_jax.models.config import ModelConfig
from openr1_jax.models.params import abstract_model, build_model, flat_variables, logical_axes, to_nested
from openr1_jax.models.presets import load_model_config
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.rules import named_sharding
from openr1_jax.train.flops import active_matmul_params, flops_per_token, mfu, peak_flops_per_device
from openr1_jax.train.loss import sft_loss
from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from openr1_jax.train.state import (
    abstract_train_state,
    init_train_state,
    merge_model,
    train_state_shardings,
)
from openr1_jax.train.step import StepConfig, jit_train_step, make_train_step

B, T = 4, 16
SGD = optax.sgd(0.5)  # updates = -0.5 * grads: parameters after one step compare the gradients themselves


def _packed_batch(seed=0):
    """Rows packed with examples of different lengths and prompt masks, so micro-batches hold different
    numbers of trained tokens (a per-micro-batch mean would be wrong)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 512, (B, T)).astype(np.int32)
    seg, pos, mask = (np.zeros((B, T), np.int32) for _ in range(3))
    for r, lengths in enumerate(([5, 7, 2], [16], [3, 3, 4], [9])):
        start = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, start : start + n], pos[r, start : start + n] = s, np.arange(n)
            mask[r, start + rng.integers(1, n) : start + n] = 1
            start += n
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _run(model, optimizer, step_cfg, batch, shardings=None, batch_sharding=None):
    """(state before, state after, metrics) of one step; the model stays usable (the step donates its input,
    which shares the model's arrays, so it gets a copy)."""
    graphdef, state = init_train_state(model, optimizer, seed=0)
    before = state
    state = jax.tree.map(jnp.copy, state)
    step = jit_train_step(
        make_train_step(graphdef, optimizer, step_cfg, lambda s: jnp.float32(0.5)), shardings, batch_sharding
    )
    if shardings is not None:
        state = jax.device_put(state, shardings)
    return before, *step(state, batch)


@pytest.fixture(scope="module")
def moe_model():
    return build_model(load_model_config("tiny-moe"), seed=3)


@pytest.fixture(scope="module")
def accumulation_runs(moe_model):
    batch = _packed_batch()
    runs = {}
    for k in (1, 2):
        cfg = StepConfig(gradient_accumulation_steps=k, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
        runs[k] = _run(moe_model, SGD, cfg, batch)
    return batch, runs


def test_accumulation_equals_one_big_batch(accumulation_runs):
    _, runs = accumulation_runs
    before, one, metrics_one = runs[1]
    _, two, metrics_two = runs[2]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(one.buffers), jax.tree.leaves(two.buffers)):
        np.testing.assert_array_equal(a, b)  # the same global loads, so the same bias update
    assert set(metrics_one) == set(metrics_two)
    for name in metrics_one:
        np.testing.assert_allclose(metrics_one[name], metrics_two[name], rtol=1e-5, err_msg=name)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before.params, one.params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did move the parameters


def test_batch_must_divide_into_micro_batches(moe_model):
    graphdef, state = init_train_state(moe_model, SGD)
    step = make_train_step(graphdef, SGD, StepConfig(gradient_accumulation_steps=3), lambda s: 0.0)
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        jax.eval_shape(step, state, _packed_batch())


def test_router_bias_moves_by_the_sign_rule_outside_the_optimizer(moe_model, accumulation_runs):
    batch, runs = accumulation_runs
    before, after, _ = runs[1]
    # Loads of the step's forward pass, recomputed independently from the starting model.
    model = merge_model(*init_train_state(moe_model, SGD)[:1], before.params, before.buffers)
    _, aux = nnx.jit(sft_loss, static_argnames=("mtp_loss_weight", "seq_aux_loss_alpha"))(
        model, batch, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01
    )
    biases = {
        "layers.1.mlp": (before.buffers["layers"][1], after.buffers["layers"][1]),
        "layers.2.mlp": (before.buffers["layers"][2], after.buffers["layers"][2]),
        "mtp.0.block.mlp": (before.buffers["mtp"][0]["block"], after.buffers["mtp"][0]["block"]),
    }
    assert sorted(aux["moe"]) == sorted(biases)
    for module, (old, new) in biases.items():
        load = np.asarray(aux["moe"][module]["expert_load"])
        old, new = (np.asarray(x["mlp"]["router"]["e_score_correction_bias"]) for x in (old, new))
        expected = old + 1e-3 * np.sign(load.mean() - load)  # default gamma for a V3 model
        np.testing.assert_allclose(new, expected, atol=1e-7, err_msg=module)
        assert np.any(new != old)
    # The bias is a buffer: not a parameter, and no optimizer state (AdamW's moments) exists for it.
    _, adamw_state = abstract_train_state(moe_model, make_optimizer(OptimizerConfig(), 10))
    for tree in (before.params, adamw_state.opt_state):
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        assert names and not any("e_score_correction_bias" in n for n in names)


def test_abstract_train_state_matches_a_real_one(moe_model):
    optimizer = make_optimizer(OptimizerConfig(weight_decay=0.1), 10)
    _, real = init_train_state(moe_model, optimizer, seed=0)
    _, abstract = abstract_train_state(abstract_model(moe_model.config), optimizer)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), real)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == shapes
    assert real.rng.dtype == jnp.uint32 and real.rng.shape == (2,) and real.step.dtype == jnp.int32


def test_dense_model_step_has_no_moe_metrics():
    model = build_model(load_model_config("tiny-dense"), seed=0)
    batch = _packed_batch()
    _, after, metrics = _run(model, SGD, StepConfig(gradient_accumulation_steps=2), batch)
    assert after.buffers == {} and int(after.step) == 1
    assert set(metrics) == {"loss", "main_loss", "balance_loss", "grad_norm", "learning_rate", "num_tokens"}
    np.testing.assert_allclose(metrics["loss"], metrics["main_loss"])  # no MTP, no balance loss
    segments = batch["segment_ids"]
    trained_targets = (batch["loss_mask"][:, 1:] == 1) & (segments[:, 1:] == segments[:, :-1])
    assert float(metrics["num_tokens"]) == trained_targets.sum()


def test_sharded_step_matches_unsharded(moe_model, accumulation_runs):
    batch, runs = accumulation_runs
    _, unsharded, metrics = runs[1]
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    variables = flat_variables(moe_model)
    by_kind = {}
    for name, var in variables.items():
        kind = "params" if isinstance(var, nnx.Param) else "buffers"
        by_kind.setdefault(kind, {})[name] = named_sharding(logical_axes(var), mesh, shape=var.value.shape)
    params_sh, buffers_sh = (_int_keys(to_nested(by_kind[k])) for k in ("params", "buffers"))
    _, abstract = abstract_train_state(moe_model, SGD)
    shardings = train_state_shardings(SGD, abstract, params_sh, buffers_sh, mesh)
    batch_sh = named_sharding(("batch", None), mesh, shape=(B, T))
    # Accumulating, inside a sharding context (activation and micro-batch constraints active).
    cfg = StepConfig(gradient_accumulation_steps=2, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    with sharding_context(mesh):
        _, sharded, sharded_metrics = _run(moe_model, SGD, cfg, batch, shardings, batch_sh)
    assert sharded.params["lm_head"]["kernel"].sharding.spec == params_sh["lm_head"]["kernel"].spec
    for a, b in zip(jax.tree.leaves(unsharded.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(metrics[name], sharded_metrics[name], rtol=1e-5, err_msg=name)


def _int_keys(tree):
    """to_nested gives string keys; nnx's pure dicts use ints for list indices."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def test_overfits_a_fixed_batch():
    model = build_model(load_model_config("tiny-moe"), seed=0)
    opt_cfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, weight_decay=0.01)
    steps = 20
    optimizer = make_optimizer(opt_cfg, steps)
    schedule = learning_rate_schedule(opt_cfg, steps)
    graphdef, state = init_train_state(model, optimizer, seed=0)
    step = jit_train_step(make_train_step(graphdef, optimizer, StepConfig(gradient_accumulation_steps=2), schedule))
    batch = _packed_batch(seed=1)
    rng0 = np.asarray(state.rng)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    losses = [float(x) for x in losses]
    assert losses[-1] < 0.6 * losses[0], losses
    expected = {"loss", "main_loss", "mtp_loss_1", "balance_loss", "grad_norm", "learning_rate", "num_tokens"}
    assert expected | {"expert_load_max_over_mean", "expert_load_cv"} == set(metrics)
    assert all(isinstance(v, jax.Array) and v.shape == () for v in metrics.values())
    assert int(state.step) == steps and not np.array_equal(np.asarray(state.rng), rng0)
    np.testing.assert_allclose(float(metrics["learning_rate"]), float(schedule(steps - 1)), rtol=1e-6)
    assert float(metrics["expert_load_max_over_mean"]) >= 1.0


# ------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------
def test_flops_per_token_hand_count_dense():
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=10,
        hidden_size=4,
        intermediate_size=6,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=2,
    )
    # Per layer: q 4*2*2 + k,v 2*4*1*2 + o 2*2*4 = 48; MLP 3*4*6 = 72. Two layers + head 4*10.
    assert active_matmul_params(cfg) == 2 * (48 + 72) + 40
    # Attention: 6 T N (Hqk + Hv) per layer, halved for causal: 3 * 8 * 2 * 4 * 2 layers.
    assert flops_per_token(cfg, 8) == 6 * 280 + 3 * 8 * 2 * 4 * 2
    assert flops_per_token(cfg, 8, causal=False) == 6 * 280 + 6 * 8 * 2 * 4 * 2
    # Cross-check against the real model: every matmul weight except the embedding gather.
    model = abstract_model(cfg)
    weights = {n: v for n, v in flat_variables(model).items() if v.value.ndim >= 2 and not n.startswith("embed")}
    assert sum(v.value.size for v in weights.values()) == active_matmul_params(cfg)


def test_flops_routed_experts_count_only_top_k():
    cfg = load_model_config("tiny-moe")
    D, F, E, K = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    # All matmul weights of the real model, minus the (E - K) routed experts a token does not visit, plus the
    # shared output head once more per MTP depth (one weight, used by every prediction head).
    model = abstract_model(cfg)
    total = sum(v.value.size for n, v in flat_variables(model).items() if v.value.ndim >= 2 and n != "embed.embedding")
    head_reuse = cfg.num_nextn_predict_layers * D * cfg.vocab_size
    assert active_matmul_params(cfg) == total - moe_layers * (E - K) * 3 * D * F + head_reuse
    more_experts = cfg.replace(n_routed_experts=2 * E, n_group=1, topk_group=1)
    assert active_matmul_params(more_experts) - active_matmul_params(cfg) == moe_layers * D * E  # router only
    more_top_k = cfg.replace(num_experts_per_tok=K + 1)
    assert active_matmul_params(more_top_k) - active_matmul_params(cfg) == moe_layers * 3 * D * F
    # MTP modules and their head count when trained with MTP.
    assert active_matmul_params(cfg, with_mtp=False) < active_matmul_params(cfg)


def test_peak_flops_and_mfu():
    assert peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v5p")) == 459e12
    assert peak_flops_per_device(types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops_per_device(jax.devices("cpu")[0]) is None
    assert peak_flops_per_device(jax.devices("cpu")[0], override=1e12) == 1e12
    assert mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, 2, None) is None
