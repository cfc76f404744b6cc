"""The Pallas kernels (interpreted on CPU) inside a sharded model: each runs per device in `jax.shard_map`
(XLA cannot partition a Mosaic kernel), and loss, MoE statistics and gradients equal the single-device XLA run."""

import jax
import pytest

from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.init import create_sharded_model
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from openr1_jax.sharding.rules import named_sharding
from tests.sharding.conftest import loss_and_grads
from tests.sharding.test_sharded_model import assert_trees_close

KERNELS = {"attention_impl": "pallas_interpret", "moe_impl": "pallas_interpret"}


@pytest.mark.parametrize(
    "mesh_cfg",
    [MeshConfig(fsdp=4, tensor=2), MeshConfig(data=2, fsdp=1, expert=2, tensor=2)],
    ids=["fsdp4_tensor2", "data2_expert2_tensor2"],
)
def test_sharded_kernels_equal_single_device_xla(tiny_moe, mesh_cfg):
    cfg, _, _, buffers, batch, ((loss, stats), grads) = tiny_moe
    mesh = make_mesh(mesh_cfg)
    with sharding_context(mesh):
        graphdef, params, sharded_buffers = create_sharded_model(cfg.replace(**KERNELS), mesh, seed=0)
        sharded_buffers = jax.tree.map(lambda ref, like: jax.device_put(ref, like.sharding), buffers, sharded_buffers)
        batch_sharding = named_sharding(("batch", None), mesh, shape=batch["input_ids"].shape)
        sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
        step = jax.jit(loss_and_grads, static_argnums=2)
        assert "shard_map" in str(
            jax.make_jaxpr(loss_and_grads, static_argnums=2)(params, sharded_buffers, graphdef, sharded_batch)
        )
        (k_loss, k_stats), k_grads = step(params, sharded_buffers, graphdef, sharded_batch)
    assert_trees_close(k_loss, loss, tol=1e-5)
    assert_trees_close(k_stats, stats, tol=1e-5)
    assert_trees_close(k_grads, grads, tol=2e-5)
