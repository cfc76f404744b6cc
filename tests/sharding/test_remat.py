"""Remat changes memory, never math: loss, gradients and sown MoE statistics are identical with it on/off,
also together with expert parallelism."""

import jax
import numpy as np
import pytest
from flax import nnx

from openr1_jax.errors import UserError
from openr1_jax.models.params import abstract_model
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.mesh import MeshConfig, make_mesh
from tests.sharding.conftest import loss_and_grads


def graphdef_for(cfg):
    return nnx.graphdef(abstract_model(cfg))


@pytest.mark.parametrize(
    "remat,mesh_cfg", [("full", None), ("save_dots", None), ("full", MeshConfig(expert=4, fsdp=2))]
)
def test_remat_is_exact(tiny_moe, remat, mesh_cfg):
    cfg, _, params, buffers, batch, reference = tiny_moe
    graphdef = graphdef_for(cfg.replace(remat=remat))
    jaxpr = str(jax.make_jaxpr(loss_and_grads, static_argnums=2)(params, buffers, graphdef, batch))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    if mesh_cfg is None:
        out = jax.jit(loss_and_grads, static_argnums=2)(params, buffers, graphdef, batch)
        tol = 1e-6  # recomputation may fuse (and so round) differently, nothing more
    else:
        with sharding_context(make_mesh(mesh_cfg)):
            out = jax.jit(loss_and_grads, static_argnums=2)(params, buffers, graphdef, batch)
        tol = 1e-5
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol, err_msg=jax.tree_util.keystr(path))


def test_remat_is_validated(tiny_moe):
    with pytest.raises(UserError, match="remat 'some'"):
        tiny_moe[0].replace(remat="some")
