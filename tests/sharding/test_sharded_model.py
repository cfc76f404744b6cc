"""Sharded == unsharded for tiny-moe on 8 CPU devices: sharded init, loss (main + MTP heads), gradients w.r.t.
every parameter, and the sown MoE statistics; parameters really are laid out as the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config
from openr1_jax.models.scan import unstack_flat
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.init import create_sharded_model, split_model
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from openr1_jax.sharding.rules import named_sharding
from tests.models.test_scan_layers import keyed
from tests.sharding.conftest import loss_and_grads

# Expected layouts: embedding [V, D], lm_head [D, V], routed gate_proj [E, D, F], q_b_proj [Q, N, H] (the q
# latent Q over fsdp: never replicated across a data-parallel mesh's fsdp axis).
MESHES = {
    "data8": (MeshConfig(data=8, fsdp=1), P(None, None), P(None, None), P(None, None, None), P(None, None, None)),
    "fsdp8": (MeshConfig(fsdp=8), P(None, "fsdp"), P("fsdp", None), P(None, "fsdp", None), P("fsdp", None, None)),
    "fsdp4_tensor2": (
        MeshConfig(fsdp=4, tensor=2),
        P("tensor", "fsdp"),
        P("fsdp", "tensor"),
        P(None, "fsdp", "tensor"),
        P("fsdp", "tensor", None),
    ),
    "expert4_fsdp2": (
        MeshConfig(expert=4, fsdp=2),
        P(None, "fsdp"),
        P("fsdp", None),
        P("expert", "fsdp", None),
        P("fsdp", None, None),
    ),
    "data2_expert2_tensor2": (
        MeshConfig(data=2, fsdp=1, expert=2, tensor=2),
        P("tensor", None),
        P(None, "tensor"),
        P("expert", None, "tensor"),
        P(None, "tensor", None),
    ),
}


def assert_trees_close(actual, expected, tol=1e-5):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_equals_unsharded(tiny_moe, name):
    cfg, _, params, buffers, batch, ((loss, stats), grads) = tiny_moe
    mesh_cfg, embed_spec, head_spec, experts_spec, q_b_spec = MESHES[name]
    mesh = make_mesh(mesh_cfg)
    with sharding_context(mesh):
        sharded_graphdef, sharded_params, sharded_buffers = create_sharded_model(cfg, mesh, seed=0)
        assert_trees_close(sharded_params, params, tol=1e-6)  # the eager build's values (to rounding)
        # The reference's (non-zero) router bias, in the sharded buffers' layout.
        sharded_buffers = jax.tree.map(lambda ref, like: jax.device_put(ref, like.sharding), buffers, sharded_buffers)

        assert sharded_params["embed"]["embedding"].sharding.spec == embed_spec
        assert sharded_params["lm_head"]["kernel"].sharding.spec == head_spec
        assert sharded_params["layers"][1]["mlp"]["experts"]["gate_proj"].sharding.spec == experts_spec
        assert sharded_params["layers"][0]["attn"]["q_b_proj"]["kernel"].sharding.spec == q_b_spec
        assert all(isinstance(a.sharding, NamedSharding) for a in jax.tree.leaves(sharded_params))

        batch_sharding = named_sharding(("batch", None), mesh, shape=batch["input_ids"].shape)
        sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        step = jax.jit(loss_and_grads, static_argnums=2)
        lowered = step.lower(sharded_params, sharded_buffers, sharded_graphdef, sharded_batch)
        uses_ep = "shard_map" in str(
            jax.make_jaxpr(loss_and_grads, static_argnums=2)(
                sharded_params, sharded_buffers, sharded_graphdef, sharded_batch
            )
        )
        assert uses_ep == (mesh.shape["expert"] > 1)
        (sharded_loss, sharded_stats), sharded_grads = lowered.compile()(sharded_params, sharded_buffers, sharded_batch)
    assert batch_sharding.spec == P(tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1) or None, None)
    np.testing.assert_allclose(float(sharded_loss), float(loss), atol=1e-5, rtol=1e-5)
    assert_trees_close(sharded_grads, grads)
    assert_trees_close(sharded_stats, stats)


def test_scanned_layers_sharded_equal_unrolled_on_one_device():
    """Scanned layers on 8 devices with the experts split (the expert-parallel shard_map runs inside the scan
    body): loss, every gradient and the per-layer expert loads equal the unrolled model's on one device."""
    cfg = load_model_config("tiny-moe", {"num_hidden_layers": 3})
    graphdef, params, buffers = split_model(build_model(cfg, seed=0))
    rng = np.random.default_rng(1)
    batch = {
        "input_ids": rng.integers(0, cfg.vocab_size, (8, 16), dtype=np.int32),
        "segment_ids": np.where(np.arange(16) < rng.integers(4, 16, size=(8, 1)), 1, 2).astype(np.int32),
    }
    (loss, stats), grads = jax.jit(loss_and_grads, static_argnums=2)(params, buffers, graphdef, batch)

    scanned_cfg = cfg.replace(scan_layers=True)
    mesh = make_mesh(MeshConfig(expert=4, fsdp=2))
    with sharding_context(mesh):
        s_graphdef, s_params, s_buffers = create_sharded_model(scanned_cfg, mesh, seed=0)
        assert s_params["layer_stacks"][1]["mlp"]["experts"]["gate_proj"].sharding.spec == P(
            None, "expert", "fsdp", None
        )
        batch_sharding = named_sharding(("batch", None), mesh, shape=batch["input_ids"].shape)
        s_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        (s_loss, s_stats), s_grads = jax.jit(loss_and_grads, static_argnums=2)(s_params, s_buffers, s_graphdef, s_batch)

    np.testing.assert_allclose(float(s_loss), float(loss), atol=1e-5, rtol=1e-5)
    expected, got = keyed(grads), unstack_flat(keyed(s_grads), scanned_cfg)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=1e-5, err_msg=name)
    loads = s_stats["layer_stacks"][1]["mlp"]["expert_load"][0]
    for row, layer in enumerate((1, 2)):
        np.testing.assert_allclose(loads[row], stats["layers"][layer]["mlp"]["expert_load"][0], atol=1e-5)
