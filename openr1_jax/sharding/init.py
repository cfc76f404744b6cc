"""Abstract, sharded initialisation: no full model is ever materialised on one device.

    abstract (nnx.eval_shape: shapes, dtypes, logical axes)  ->  shardings from the rules table
    ->  jax.jit(init, out_shardings=shardings)()  (every device creates only its own shards)

The train state keeps parameters as pure nested dicts (the contract's `TrainState.params` / `.buffers`) and
the model's `graphdef` outside, static. The round trip with flax 0.12:

    graphdef, params, buffers = create_sharded_model(cfg, mesh, rules, seed=0)   # pure dicts, sharded
    model = merge_model(graphdef, params, buffers)          # in a step: the nnx model back, ready to call
    _, params, buffers = split_model(model)                 # ... and pure dicts again (e.g. after an update)

`split_model` is `nnx.split(model, nnx.Param, ...)` then `State.to_pure_dict()`; `merge_model` is
`nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))`: in flax 0.12 the graphdef records each
Variable's type and metadata (RouterBias vs Param, logical axes), so plain arrays are enough to rebuild the
module (`State.replace_by_pure_dict` on an abstract state is the equivalent long way round). Dict keys are
those of `State.to_pure_dict()`: strings, and ints for list entries (`params["layers"][0]`).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.transformer import CausalLM
from openr1_jax.sharding.rules import DEFAULT_RULES, Rules, named_sharding

PureDict = dict[str, Any]


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding the rules give a Variable, from its logical axes (`out_sharding` metadata)."""
    shape = var.value.shape
    axes = var.get_metadata().get("out_sharding") or (None,) * len(shape)
    return named_sharding(axes, mesh, rules, shape)


def state_shardings(abstract: nnx.Module | nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> PureDict:
    """NamedShardings for every Variable, as a pure nested dict shaped like `State.to_pure_dict()`."""
    state = nnx.state(abstract) if isinstance(abstract, nnx.Module) else abstract
    flat = [(path, variable_sharding(var, mesh, rules)) for path, var in nnx.to_flat_state(state)]
    out: PureDict = {}
    for path, sharding in flat:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = sharding
    return out


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PureDict, PureDict]:
    """(graphdef, params, buffers), the last two as pure nested dicts: `nnx.Param`s, and every other Variable
    (e.g. RouterBias)."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), buffers.to_pure_dict()


def merge_model(graphdef: nnx.GraphDef, params: PureDict, buffers: PureDict) -> nnx.Module:
    """The nnx model from its graphdef and pure dicts (works under jit: no arrays are copied)."""
    return nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))


def sharded_init(build_fn, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> tuple[nnx.GraphDef, PureDict, PureDict]:
    """`build_fn()` -> nnx module, initialised directly into its sharded layout; returns (graphdef, params,
    buffers) with every array a global jax.Array sharded as the rules say."""
    abstract = nnx.eval_shape(build_fn)
    graphdef, abs_params, abs_buffers = nnx.split(abstract, nnx.Param, ...)
    shardings = (state_shardings(abs_params, mesh, rules), state_shardings(abs_buffers, mesh, rules))
    init = jax.jit(lambda: split_model(build_fn())[1:], out_shardings=shardings)
    params, buffers = init()
    return graphdef, params, buffers


def create_sharded_model(
    cfg: ModelConfig,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    dtype="float32",
    param_dtype="float32",
    seed: int = 0,
) -> tuple[nnx.GraphDef, PureDict, PureDict]:
    """A freshly initialised CausalLM as (graphdef, params, buffers), sharded over `mesh` (same values as
    `models.params.build_model(cfg, seed=seed)` on one device)."""
    return sharded_init(lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)), mesh, rules)
