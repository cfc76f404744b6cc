"""The train state: one pytree of pure arrays (what orbax saves), with the model's graphdef kept outside.

  TrainState(step, params, buffers, opt_state, rng)

`params` is the nnx.Param state and `buffers` every other variable (DeepSeek-V3's router correction bias,
learned outside the optimizer), both as plain nested dicts, so the state can be saved, restored into an
abstract target and sharded without any NNX object in it. `merge_model` rebuilds a module from the three.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openr1_jax.sharding.init import merge_model, split_model  # noqa: F401 (the train state API)

Params = dict[str, Any]


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Params  # nnx.Param state as a pure nested dict
    buffers: Params  # every other variable (RouterBias), pure nested dict; may be empty
    opt_state: optax.OptState
    rng: jax.Array  # raw jax.random key data, uint32 [2]


def create_train_state(params: Params, buffers: Params, optimizer: optax.GradientTransformation, seed) -> TrainState:
    """A fresh state from arrays; pure, so `jax.jit(..., out_shardings=...)` can build it already sharded."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        buffers=buffers,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.PRNGKey(seed)).astype(jnp.uint32),
    )


def init_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """The state holds the model's own arrays (no copy): a step that donates it invalidates `model`."""
    graphdef, params, buffers = split_model(model)
    return graphdef, create_train_state(params, buffers, optimizer, seed)


def abstract_train_state(model: nnx.Module, optimizer: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState of jax.ShapeDtypeStruct): a restore target costing no memory. `model` may be
    abstract (`models.params.abstract_model`) or concrete."""
    graphdef, params, buffers = split_model(model)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, buffers))
    return graphdef, jax.eval_shape(lambda p, b: create_train_state(p, b, optimizer, 0), *shapes)


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation, params: Params, params_shardings: Params, mesh: Mesh
) -> optax.OptState:
    """Shardings for `optimizer.init(params)`: every params-shaped subtree (Adam's mu and nu) is sharded like
    the params, every other leaf (step counts, clipping state) is replicated on `mesh`.

    `params` may be ShapeDtypeStructs. (optax.tree_map_params would init on a placeholder, which the
    weight-decay mask, a function of the params' shapes, cannot take.)"""
    abstract = jax.eval_shape(optimizer.init, params)
    params_def = jax.tree.structure(params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params_like(node) -> bool:
        return isinstance(node, dict) and jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: params_shardings if is_params_like(node) else replicated,
        abstract,
        is_leaf=is_params_like,
    )


def train_state_shardings(
    optimizer: optax.GradientTransformation,
    abstract_state: TrainState,
    params_shardings: Params,
    buffers_shardings: Params,
    mesh: Mesh,
) -> TrainState:
    """A TrainState of shardings (for jit in/out_shardings and orbax restore targets)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        step=replicated,
        params=params_shardings,
        buffers=buffers_shardings,
        opt_state=optimizer_state_shardings(optimizer, abstract_state.params, params_shardings, mesh),
        rng=replicated,
    )
