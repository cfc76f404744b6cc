"""Ahead-of-time compilation of the training and rollout programs from shapes alone: no parameters, no data, no
accelerator.

    compile_sft_step(model_cfg, mesh, batch_size=..., seq_len=...)        the SFT train step
    compile_grpo_step(model_cfg, mesh, batch_size=..., seq_len=..., ...)  the GRPO train step
    compile_logps(model_cfg, mesh, batch_size=..., seq_len=...)           the frozen reference's log-probs (beta > 0)
    compile_decode(model_cfg, mesh, slots=..., cache_len=..., ...)        one chunk of the engine's decode loop

each lower and compile one sharded program for the devices of `mesh`. With libtpu installed those may be the TPU
devices of a topology description (`jax.experimental.topologies.get_topology_desc`) on a CPU-only machine:
libtpu's compiler then proves the program (Pallas kernels included) compiles for that TPU generation, and its
memory and cost analyses say what one call needs per device and how many FLOPs and bytes it moves.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openr1_jax.models.config import ModelConfig
from openr1_jax.models.transformer import CausalLM
from openr1_jax.sharding.context import sharding_context
from openr1_jax.sharding.init import state_shardings
from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding
from openr1_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from openr1_jax.train.state import TrainState, create_train_state, train_state_shardings
from openr1_jax.train.step import StepConfig, jit_train_step, make_train_step

SFT_BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


@dataclass(frozen=True)
class StateBytes:
    """Bytes per device of what stays resident, from the shardings (no compile needed)."""

    params: int
    optimizer: int
    gradients: int  # the train steps accumulate gradients in float32, shaped and sharded like the parameters
    kv_cache: int = 0  # the rollout's decode state (per-layer caches of every slot)
    reference: int = 0  # GRPO with beta > 0: the frozen reference parameters


@dataclass(frozen=True)
class CompiledStep:
    compiled: jax.stages.Compiled
    memory: dict[str, int]  # bytes per device: arguments, outputs, temporaries, generated code, aliased
    flops: float | None  # per device, from the compiler's cost analysis (None: unknown, see plan/estimate.py)
    bytes_accessed: float | None  # per device
    state: StateBytes

    @property
    def peak_bytes(self) -> int:
        """Live bytes per device during the call: arguments + outputs + temporaries - donated (aliased)."""
        m = self.memory
        return m["argument"] + m["output"] + m["temp"] - m["alias"]


class StepTooLarge(Exception):
    """The compiler ran out of device memory; `state` says what the resident state alone needs per device, and
    `temporaries` the bytes of temporaries the compiler asked for (None when its message does not say)."""

    def __init__(self, message: str, state: StateBytes):
        super().__init__(message)
        self.state = state
        self.temporaries = compiler_temporaries(message)


# libtpu 0.0.42: "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries
# (41.56G) exceeds available HBM (31.25G)." Its G is 2**30 bytes: a v6e's 32 GiB print as 31.25G available.
_TEMPORARIES = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\)")


def compiler_temporaries(message: str) -> int | None:
    """The temporaries figure of an out-of-HBM compile error, in bytes."""
    m = _TEMPORARIES.search(message)
    return None if m is None else int(float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1))


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, for uneven splits)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _float32_like(params):
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params)


@dataclass(frozen=True)
class AbstractTrainState:
    """The sharded train state as ShapeDtypeStructs: what `jit(...).lower` needs instead of arrays."""

    graphdef: nnx.GraphDef
    state: TrainState
    shardings: TrainState

    def bytes(self) -> StateBytes:
        s = self.state
        return StateBytes(
            per_device_bytes(s.params), per_device_bytes(s.opt_state), per_device_bytes(_float32_like(s.params))
        )


def abstract_train_state(model_cfg: ModelConfig, mesh: Mesh, tx, dtype: str, param_dtype: str) -> AbstractTrainState:
    """The train state of `model_cfg` laid out on `mesh` by the default rules. Call inside `sharding_context`."""
    abstract = nnx.eval_shape(lambda: CausalLM(model_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_buffers = nnx.split(abstract, nnx.Param, ...)
    params_sh, buffers_sh = state_shardings(abs_params, mesh), state_shardings(abs_buffers, mesh)
    params, buffers = (
        jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), s.to_pure_dict())
        for s in (abs_params, abs_buffers)
    )
    shapes = jax.eval_shape(lambda p, b: create_train_state(p, b, tx, 0), params, buffers)
    shardings = train_state_shardings(tx, shapes, params_sh, buffers_sh, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return AbstractTrainState(graphdef, state, shardings)


def _compile(lowered: jax.stages.Lowered, state: StateBytes) -> CompiledStep:
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise StepTooLarge(str(e).splitlines()[0], state) from None
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
    return CompiledStep(compiled, memory, flops, nbytes, state)


def _count_accumulation(step: CompiledStep, micro_batches: int) -> CompiledStep:
    """XLA's cost analysis counts a loop body once: the gradient-accumulation scan runs `micro_batches` times.
    Scale the whole step, then take back the optimizer update (outside the loop) counted too often - its traffic
    reads parameters, gradients and optimizer state and writes parameters and optimizer state."""
    if micro_batches == 1:
        return step
    s = step.state
    update_bytes = 2 * (s.params + s.optimizer) + s.gradients
    nbytes = micro_batches * step.bytes_accessed - (micro_batches - 1) * update_bytes
    return dataclasses.replace(step, flops=micro_batches * step.flops, bytes_accessed=max(nbytes, step.bytes_accessed))


def _rows(mesh: Mesh, shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    """An input whose rows are split over the batch axes (the layout the jobs feed)."""
    sharding = named_sharding(("batch",) + (None,) * (len(shape) - 1), mesh, DEFAULT_RULES, shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


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
        train = abstract_train_state(model_cfg, mesh, tx, dtype, param_dtype)
        batch = {k: _rows(mesh, (batch_size, seq_len)) for k in SFT_BATCH_KEYS}
        train_step = jit_train_step(
            make_train_step(train.graphdef, tx, step, learning_rate_schedule(optimizer_cfg, total_steps)),
            train.shardings,
            {k: v.sharding for k, v in batch.items()},
        )
        compiled = _compile(train_step.lower(train.state, batch), train.bytes())
    return _count_accumulation(compiled, step.gradient_accumulation_steps)


def compile_grpo_step(
    model_cfg: ModelConfig,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    loss,  # rl.loss.LossConfig
    temperature: float = 1.0,
    micro_batches: int = 1,
    on_policy: bool = True,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    optimizer: OptimizerConfig | None = None,
    bias_update_rate: float = 0.0,
    total_steps: int = 1000,
) -> CompiledStep:
    """The GRPO train step on a [batch_size, seq_len] batch of prompt + completion rows (see rl/step.py)."""
    from openr1_jax.rl.step import BATCH_KEYS, make_grpo_step

    optimizer_cfg = optimizer or OptimizerConfig()
    tx = make_optimizer(optimizer_cfg, total_steps)
    with sharding_context(mesh, DEFAULT_RULES):
        train = abstract_train_state(model_cfg, mesh, tx, dtype, param_dtype)
        B, T = batch_size, seq_len
        dtypes = {"input_ids": jnp.int32, "valid": jnp.int32}
        batch = {k: _rows(mesh, (B, T), dtypes.get(k, jnp.float32)) for k in BATCH_KEYS}
        batch["advantages"] = _rows(mesh, (B,), jnp.float32)
        batch["num_items"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
        step_fn = make_grpo_step(
            train.graphdef,
            tx,
            loss,
            temperature=temperature,
            micro_batches=micro_batches,
            on_policy=on_policy,
            schedule=learning_rate_schedule(optimizer_cfg, total_steps),
            bias_update_rate=bias_update_rate,
        )
        train_step = jit_train_step(step_fn, train.shardings, {k: v.sharding for k, v in batch.items()})
        compiled = _compile(train_step.lower(train.state, batch), train.bytes())
    return _count_accumulation(compiled, micro_batches)


def compile_logps(
    model_cfg: ModelConfig,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    temperature: float = 1.0,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
) -> CompiledStep:
    """The frozen reference model's per-token log-probs over a generation batch (GRPO with beta > 0)."""
    from openr1_jax.rl.step import make_logps_fn

    tx = make_optimizer(OptimizerConfig(), 1)
    with sharding_context(mesh, DEFAULT_RULES):
        train = abstract_train_state(model_cfg, mesh, tx, dtype, param_dtype)
        ids, valid = _rows(mesh, (batch_size, seq_len)), _rows(mesh, (batch_size, seq_len))
        fn = jax.jit(make_logps_fn(train.graphdef, temperature))
        lowered = fn.lower(train.state.params, train.state.buffers, ids, valid)
        return _compile(lowered, dataclasses.replace(train.bytes(), optimizer=0, gradients=0))


def compile_decode(
    model_cfg: ModelConfig,
    mesh: Mesh,
    *,
    slots: int,
    cache_len: int,
    max_new: int,
    chunk_size: int = 32,
    num_stop: int = 8,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
) -> CompiledStep:
    """One chunk of the generation engine's decode loop (`generate/engine.py` `_decode`) over `slots` rows with
    caches of `cache_len` positions, the parameters in their training layout (the co-located rollout).
    FLOPs and bytes are per decode step (one token for every slot), the chunk's one-off work spread over its
    `chunk_size` steps. The compiler's cost analysis counts the loop body once and the work around it in full:
    the caches converted to the decode layout and back, and, where parameters are stored in a wider dtype than
    the compute dtype, their cast, which libtpu hoists out of the loop (moe-1b, 16 slots, float32 parameters:
    19.0 GB counted for the chunk, 8.4 GB per step once spread). The chunk is compiled a second time with two
    steps per loop iteration (then the loop of one), which counts three steps: the difference is two."""
    from openr1_jax.generate import engine

    tx = make_optimizer(OptimizerConfig(), 1)
    with sharding_context(mesh, DEFAULT_RULES):
        train = abstract_train_state(model_cfg, mesh, tx, dtype, param_dtype)
        params, buffers = train.state.params, train.state.buffers
        graph = engine.static_graph(train.graphdef)
        sizes = dict(slots=slots, cache_len=cache_len, max_new=max_new, num_stop=num_stop)
        # The decode state's shapes from the engine's own constructor; its rows over the batch axes, as the
        # engine constrains them.
        shapes = jax.eval_shape(
            lambda p, b: engine._empty_state(graph, p, b, **sizes), _unsharded(params), _unsharded(buffers)
        )
        state = jax.tree.map(lambda a: _rows(mesh, a.shape, a.dtype), shapes)
        resident = dataclasses.replace(train.bytes(), optimizer=0, gradients=0, kv_cache=per_device_bytes(state))

        def compile_unrolled(unroll: int) -> CompiledStep:
            # The longest chunk's program: attention over the whole cache (earlier chunks read a prefix of it).
            lowered = engine._decode.lower(
                graph, params, buffers, state, steps=chunk_size, prefix=cache_len, unroll=unroll
            )
            return _compile(lowered, resident)

        chunk = compile_unrolled(1)
        try:
            unrolled = compile_unrolled(2)
        except StepTooLarge:  # the probe alone ran out of HBM: its costs are unknown, not wrong
            return dataclasses.replace(chunk, flops=None, bytes_accessed=None)
    return _per_decode_step(chunk, unrolled, chunk_size)


def _per_decode_step(chunk: CompiledStep, unrolled: CompiledStep, chunk_size: int) -> CompiledStep:
    """`chunk` counts its one-off work and one step (one loop body), `unrolled` the same work and three (a loop
    of two steps per iteration, then the loop of one): one step plus the one-off work / chunk_size."""

    def per_step(one: float, three: float) -> float:
        step = max(three - one, 0.0) / 2
        return step + max(one - step, 0.0) / chunk_size

    return dataclasses.replace(
        chunk,
        flops=per_step(chunk.flops, unrolled.flops),
        bytes_accessed=per_step(chunk.bytes_accessed, unrolled.bytes_accessed),
    )


def _unsharded(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
