"""Ahead-of-time compilation of the SFT train step from shapes alone: no parameters, no data, no accelerator.

`compile_sft_step(model_cfg, mesh, batch_size=..., seq_len=...)` lowers and compiles one sharded train step for
the devices of `mesh`. With libtpu installed those may be the TPU devices of a topology description
(`jax.experimental.topologies.get_topology_desc`) on a CPU-only machine: libtpu's compiler then proves the
step (Pallas kernels included) compiles for that TPU generation, and its memory and cost analyses say what one
step needs per device and how many FLOPs and bytes it moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.transformer import CausalLM
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.init import state_shardings
from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from openr1_jax.train.state import create_train_state, train_state_shardings
from openr1_jax.train.step import StepConfig, jit_train_step, make_train_step

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


@dataclass(frozen=True)
class StateBytes:
    """Bytes per device of what the train state holds, from its shardings (no compile needed)."""

    params: int
    optimizer: int
    gradients: int  # the step accumulates gradients in float32, shaped and sharded like the parameters


@dataclass(frozen=True)
class CompiledStep:
    compiled: jax.stages.Compiled
    memory: dict[str, int]  # bytes per device: arguments, outputs, temporaries, generated code, aliased
    flops: float  # per device, from the compiler's cost analysis
    bytes_accessed: float  # per device
    state: StateBytes

    @property
    def peak_bytes(self) -> int:
        """Live bytes per device during the step: arguments + outputs + temporaries - donated (aliased)."""
        m = self.memory
        return m["argument"] + m["output"] + m["temp"] - m["alias"]


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, for uneven splits)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(state) -> StateBytes:
    grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), state.params)
    return StateBytes(per_device_bytes(state.params), per_device_bytes(state.opt_state), per_device_bytes(grads))


class StepTooLarge(Exception):
    """The compiler ran out of device memory; `state` says what the train state alone needs per device."""

    def __init__(self, message: str, state: StateBytes):
        super().__init__(message)
        self.state = state


def compile_sft_step(
    model_cfg: ModelConfig,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    step: StepConfig | None = None,
    optimizer: OptimizerConfig | None = None,
    total_steps: int = 1000,
) -> CompiledStep:
    step = step or StepConfig()
    optimizer_cfg = optimizer or OptimizerConfig()
    tx = make_optimizer(optimizer_cfg, total_steps)
    with sharding_context(mesh, DEFAULT_RULES):
        abstract = nnx.eval_shape(lambda: CausalLM(model_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
        graphdef, abs_params, abs_buffers = nnx.split(abstract, nnx.Param, ...)
        params_sh, buffers_sh = state_shardings(abs_params, mesh), state_shardings(abs_buffers, mesh)
        params, buffers = (
            jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), s.to_pure_dict())
            for s in (abs_params, abs_buffers)
        )
        abstract_state = jax.eval_shape(lambda p, b: create_train_state(p, b, tx, 0), params, buffers)
        shardings = train_state_shardings(tx, abstract_state, params_sh, buffers_sh, mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        batch_sharding = named_sharding(("batch", None), mesh, DEFAULT_RULES, (batch_size, seq_len))
        batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding) for k in BATCH_KEYS}
        train_step = jit_train_step(
            make_train_step(graphdef, tx, step, learning_rate_schedule(optimizer_cfg, total_steps)),
            shardings,
            {k: batch_sharding for k in BATCH_KEYS},
        )
        lowered = train_step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise StepTooLarge(str(e).splitlines()[0], state_bytes(state)) from None
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returns one dict per device program
    memory = {
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
    }
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return CompiledStep(compiled, memory, flops, nbytes, state_bytes(state))
