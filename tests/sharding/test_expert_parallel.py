"""Expert parallelism equals the single-device ragged path (forward and gradients), and the sown MoE
statistics match hand-computed values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.models.config import MoEConfig
from openr1_jax.models.moe import MoE
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.expert_parallel import expert_axis
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from openr1_jax.sharding.rules import DEFAULT_RULES

CFG = MoEConfig(
    hidden_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
)


def loss_and_grads(graphdef, state, x_BxTxD):
    def loss(state, x):
        moe = nnx.merge(graphdef, state)
        y = moe(x)
        stats = nnx.pop(moe, nnx.Intermediate)
        return jnp.sum(jnp.sin(y)), (y, stats)

    (value, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x_BxTxD)
    return value, y, stats, grads


@pytest.fixture(scope="module")
def moe_and_reference():
    moe = MoE(CFG, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0))
    # A non-zero correction bias so that selection and gate values differ, as in a trained V3 model.
    moe.router.e_score_correction_bias.value = jax.random.normal(jax.random.key(1), (8,)) * 0.1
    graphdef, state = nnx.split(moe, nnx.Not(nnx.Intermediate))
    return graphdef, state


@pytest.mark.parametrize(
    "mesh_cfg,shape,gathered",
    [
        (MeshConfig(expert=4, fsdp=2), (4, 6), True),  # tokens sharded over expert: all_gather + psum_scatter
        (MeshConfig(data=2, expert=2, tensor=2), (4, 6), True),  # F split over tensor: + psum over tensor
        (MeshConfig(expert=8, fsdp=1), (1, 5), False),  # 5 tokens do not split: replicated tokens, psum
    ],
)
def test_expert_parallel_equals_ragged(moe_and_reference, mesh_cfg, shape, gathered):
    graphdef, state = moe_and_reference
    x = jax.random.normal(jax.random.key(2), (*shape, CFG.hidden_size))
    ref = jax.jit(loss_and_grads, static_argnums=0)(graphdef, state, x)

    mesh = make_mesh(mesh_cfg)
    assert expert_axis(mesh, DEFAULT_RULES, CFG.num_experts) == "expert"
    with sharding_context(mesh):
        jaxpr = str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(graphdef, state, x))
        assert "shard_map" in jaxpr and ("psum_scatter" in jaxpr or "reduce_scatter" in jaxpr) == gathered
        out = jax.jit(loss_and_grads, static_argnums=0)(graphdef, state, x)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mesh_cfg,shape,chunks,scanned",
    [
        (MeshConfig(expert=4, fsdp=2), (4, 6), 4, True),  # 24 gathered tokens in 4 chunks of 6
        (MeshConfig(data=2, expert=2, tensor=2), (4, 6), 3, True),  # and with F split over tensor
        (MeshConfig(expert=8, fsdp=1), (1, 5), 4, False),  # 4 does not divide 5 tokens: one chunk
    ],
)
def test_token_chunks_give_the_same_result(moe_and_reference, mesh_cfg, shape, chunks, scanned):
    """`token_chunks` runs the local experts on slices of the gathered tokens in a rematerialised scan: the same
    outputs, statistics and gradients as the single-device ragged path."""
    graphdef, state = moe_and_reference
    chunked_cfg = dataclasses.replace(CFG, token_chunks=chunks)
    chunked = nnx.graphdef(MoE(chunked_cfg, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(3), (*shape, CFG.hidden_size))
    ref = jax.jit(loss_and_grads, static_argnums=0)(graphdef, state, x)
    with sharding_context(make_mesh(mesh_cfg)):
        jaxpr = str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(chunked, state, x))
        assert (f"length={chunks}" in jaxpr and "remat" in jaxpr) == scanned
        out = jax.jit(loss_and_grads, static_argnums=0)(chunked, state, x)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_without_expert_axis_the_ragged_path_runs(moe_and_reference):
    graphdef, state = moe_and_reference
    x = jnp.ones((2, 3, CFG.hidden_size))
    with sharding_context(make_mesh(MeshConfig(fsdp=4, tensor=2))):
        assert "shard_map" not in str(jax.make_jaxpr(loss_and_grads, static_argnums=0)(graphdef, state, x))


def test_statistics_match_hand_computed_values():
    """E=4, K=2, sigmoid scores, no groups: tokens are one-hot so each picks a known row of router logits."""
    cfg = MoEConfig(hidden_size=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=2, n_shared_experts=0)
    moe = MoE(cfg, param_dtype="float32", dtype="float32", rngs=nnx.Rngs(0))
    logits = np.array([[2.0, 1.0, -1.0, 0.0], [-2.0, 0.5, 3.0, 1.0], [0.0, 0.0, 1.0, -3.0]], np.float32)
    moe.router.kernel.value = jnp.asarray(logits)
    rows = [[0, 0, 1], [2, 1, 1]]  # B=2 rows of T=3 tokens, each token is a one-hot over the 3 logit rows
    x = jnp.asarray(np.eye(3, dtype=np.float32)[rows])
    moe(x)
    stats = nnx.pop(moe, nnx.Intermediate)

    s = 1 / (1 + np.exp(-logits))  # sigmoid affinities per logit row
    top2 = {0: {0, 1}, 1: {2, 3}, 2: {2, 0}}  # the two largest logits of each row (ties broken low-first)
    load = np.zeros(4)
    balance = 0.0
    for row in rows:
        f = np.zeros(4)
        for r in row:
            for i in top2[r]:
                f[i] += 1
        load += f
        f *= 4 / (2 * 3)  # E / (K T)
        p = np.mean([s[r] / s[r].sum() for r in row], axis=0)
        balance += np.sum(f * p) / len(rows)
    np.testing.assert_array_equal(stats["expert_load"][0], load)
    assert load.tolist() == [3, 2, 4, 3]
    np.testing.assert_allclose(stats["balance_loss"][0], balance, rtol=1e-6)
    assert stats["expert_load"][0].dtype == jnp.float32 and stats["balance_loss"][0].shape == ()


def test_masked_tokens_do_not_count_in_the_statistics():
    """Padding (token_mask 0) leaves expert_load and the balance loss exactly as if it were not there: the
    model is causal, so the first half of a row routes the same with or without a padded second half."""
    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_model_config
    from openr1_jax.train.loss import moe_statistics

    model = build_model(load_model_config("tiny-moe"))
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 512, (2, 16)))
    mask = jnp.arange(16)[None, :] < 8

    def stats(**kw):
        model(**kw)
        return moe_statistics(nnx.pop(model, nnx.Intermediate))

    short, padded, unmasked = stats(input_ids=ids[:, :8]), stats(input_ids=ids, token_mask=mask), stats(input_ids=ids)
    assert short.keys() == padded.keys() == {"layers.1.mlp", "layers.2.mlp", "mtp.0.block.mlp"}
    for module in short:
        K = 2
        assert padded[module]["expert_load"].sum() == 2 * 8 * K and unmasked[module]["expert_load"].sum() == 2 * 16 * K
        if module.startswith("mtp"):  # MTP sees token i+1 at position i: position 7 differs once truncated
            continue
        np.testing.assert_array_equal(padded[module]["expert_load"], short[module]["expert_load"])
        np.testing.assert_allclose(padded[module]["balance_loss"], short[module]["balance_loss"], rtol=1e-6)


def test_statistics_accumulate_eagerly_and_are_skipped_in_a_closure(moe_and_reference):
    graphdef, state = moe_and_reference
    moe = nnx.merge(graphdef, state)
    x = jnp.ones((2, 3, CFG.hidden_size))
    moe(x)
    moe(x)
    assert len(moe.expert_load.value) == 2  # sow appends one entry per call
    assert float(moe.expert_load.value[0].sum()) == 2 * 3 * CFG.num_experts_per_tok
    nnx.pop(moe, nnx.Intermediate)
    y = jax.jit(lambda x: moe(x))(x)  # a module closed over by jax.jit: no statistics, no error
    assert y.shape == x.shape and not nnx.state(moe, nnx.Intermediate)
