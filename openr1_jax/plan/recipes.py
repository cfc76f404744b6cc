"""The programs each recipe runs on the slice, compiled ahead of time.

  SFT    the train step (gradient accumulation inside), once per optimizer step
  GRPO   the train step, once per optimizer step;
         the rollout's decode step (one token for every engine slot), waves x max_completion_length times per
         generation - an upper bound, as if every completion ran to its limit; prompt prefill is not counted
         (decode dominates for R1-length completions);
         the frozen reference's log-probs over the generation batch when beta > 0, once per generation;
         a generation feeds `optimizer_steps_per_generation` optimizer steps.
GRPO samples on the training parameters in place (co-located), so the optimizer state (and the reference)
stay in HBM while the engine decodes: they count in the rollout's total.
"""

from __future__ import annotations

import itertools
import math

from openr1_jax.plan.estimate import Plan, choose_depth, compile_program
from openr1_jax.plan.topology import Topology, parse_topology
from openr1_jax.train import aot, flops


def _setup(cfg, topology: str | Topology, mesh):
    from openr1_jax.sharding.mesh import MESH_AXES, make_mesh
    from openr1_jax.train.sft import resolve_model

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    model_cfg, _ = resolve_model(cfg.model)
    device_mesh = make_mesh(mesh or cfg.mesh, topo.devices())
    sizes = {a: int(device_mesh.shape[a]) for a in MESH_AXES}
    return topo, model_cfg, device_mesh, sizes


def _train_state_bytes(cfg, device_mesh, optimizer_cfg):
    """Exact resident train state per chip of a model config (abstract: nothing is allocated or compiled)."""
    from openr1_jax.sharding.context import sharding_context
    from openr1_jax.sharding.rules import DEFAULT_RULES
    from openr1_jax.train.optimizer import make_optimizer

    tx = make_optimizer(optimizer_cfg, 1000)

    def state_at(model_cfg):
        with sharding_context(device_mesh, DEFAULT_RULES):
            return aot.abstract_train_state(model_cfg, device_mesh, tx, cfg.model.dtype, cfg.model.param_dtype).bytes()

    return state_at


def plan_sft(cfg, topology: str | Topology, mesh=None, depth: str = "auto") -> Plan:
    """Compile `cfg`'s (an SFTConfig) train step for the slice with `mesh` (default: the config's)."""
    topo, model_cfg, device_mesh, sizes = _setup(cfg, topology, mesh)
    d = choose_depth(model_cfg, depth)
    B, T = cfg.batch_size, cfg.data.seq_len
    with_mtp = cfg.training.mtp_loss_weight > 0
    step = compile_program(
        "train step",
        model_cfg,
        d,
        lambda m: aot.compile_sft_step(
            m,
            device_mesh,
            batch_size=B,
            seq_len=T,
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            step=cfg.training,
            optimizer=cfg.optimizer,
        ),
        _train_state_bytes(cfg, device_mesh, cfg.optimizer),
        tokens=B * T,
        model_flops=flops.flops_per_token(model_cfg, T, with_mtp=with_mtp) * B * T / topo.chips,
        scans_layers=True,
    )
    return Plan("sft", topo, sizes, d, (step,), (1.0,), B * T, notes=_notes(model_cfg))


def _notes(model_cfg) -> tuple[str, ...]:
    """What the report must add about a model's compiled costs."""
    if model_cfg.is_moe and model_cfg.moe_token_chunks > 1:
        return (
            f"the MoE runs its {model_cfg.moe_token_chunks} token chunks in a loop, whose body XLA's cost analysis "
            "counts once: the compiled FLOPs and bytes leave out the other chunks (the roofline's FLOPs are at least "
            "the model's; the extra reads of the experts' weights are not in its bytes)",
        )
    return ()


def _bucket(n: int, minimum: int = 8) -> int:  # the engine's shape buckets (generate/engine.py)
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def plan_grpo(cfg, topology: str | Topology, mesh=None, depth: str = "auto") -> Plan:
    """Compile `cfg`'s (a GRPOConfig) train step, rollout decode step and reference log-probs for the slice."""
    import dataclasses

    from openr1_jax.rl.loss import LossConfig

    topo, model_cfg, device_mesh, sizes = _setup(cfg, topology, mesh)
    d = choose_depth(model_cfg, depth)
    dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    T = cfg.max_prompt_length + cfg.max_completion_length
    N = cfg.generation_batch_size
    steps_per_generation = cfg.optimizer_steps_per_generation
    train_bytes = _train_state_bytes(cfg, device_mesh, cfg.optimizer)
    with_reference = cfg.beta > 0

    def resident(model_cfg, *, optimizer: bool, gradients: bool):
        s = train_bytes(model_cfg)
        return dataclasses.replace(
            s,
            optimizer=s.optimizer if optimizer else 0,
            gradients=s.gradients if gradients else 0,
            reference=s.params if with_reference else 0,
        )

    full = resident(model_cfg, optimizer=True, gradients=False)
    # held in HBM outside the program being compiled: the reference always, the optimizer state while sampling
    reference_bytes = full.reference
    optimizer_bytes = full.optimizer
    loss = LossConfig(
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        delta=cfg.delta,
        beta=cfg.beta,
        max_completion_length=cfg.max_completion_length,
    )
    on_policy = cfg.num_iterations == 1 and cfg.generation_steps == cfg.gradient_accumulation_steps
    train_flops_per_token = flops.flops_per_token(model_cfg, T, with_mtp=False)
    programs, calls = [], []
    programs.append(
        compile_program(
            "train step",
            model_cfg,
            d,
            lambda m: aot.compile_grpo_step(
                m,
                device_mesh,
                batch_size=cfg.batch_size,
                seq_len=T,
                loss=loss,
                temperature=cfg.temperature,
                micro_batches=cfg.gradient_accumulation_steps,
                on_policy=on_policy,
                optimizer=cfg.optimizer,
                bias_update_rate=cfg.bias_update_rate,
                **dtypes,
            ),
            lambda m: resident(m, optimizer=True, gradients=True),
            tokens=cfg.batch_size * T,
            model_flops=train_flops_per_token * cfg.batch_size * T / topo.chips,
            resident_elsewhere=reference_bytes,
            scans_layers=True,
        )
    )
    calls.append(1.0)

    slots = min(cfg.rollout.max_batch_size, _bucket(N, minimum=1))
    waves = math.ceil(N / slots)
    programs.append(
        compile_program(
            "rollout decode step",
            model_cfg,
            d,
            lambda m: aot.compile_decode(
                m,
                device_mesh,
                slots=slots,
                cache_len=_bucket(T),
                max_new=_bucket(cfg.max_completion_length),
                chunk_size=cfg.rollout.chunk_size,
                **dtypes,
            ),
            lambda m: dataclasses.replace(
                resident(m, optimizer=True, gradients=False),
                kv_cache=_kv_cache_bytes(m, device_mesh, slots, _bucket(T), cfg.model.dtype),
            ),
            tokens=slots,
            # forward only: a third of the training count, attention over half the sequence on average
            model_flops=train_flops_per_token / 3 * slots / topo.chips,
            resident_elsewhere=optimizer_bytes + reference_bytes,
        )
    )
    calls.append(waves * cfg.max_completion_length / steps_per_generation)

    if with_reference:
        programs.append(
            compile_program(
                "reference log-probs",
                model_cfg,
                d,
                lambda m: aot.compile_logps(
                    m, device_mesh, batch_size=N, seq_len=T, temperature=cfg.temperature, **dtypes
                ),
                lambda m: resident(m, optimizer=True, gradients=False),
                tokens=N * T,
                model_flops=train_flops_per_token / 3 * N * T / topo.chips,
                resident_elsewhere=optimizer_bytes + reference_bytes,
                scans_layers=True,
            )
        )
        calls.append(1.0 / steps_per_generation)
    generated = N * cfg.max_completion_length // steps_per_generation
    return Plan("grpo", topo, sizes, d, tuple(programs), tuple(calls), cfg.batch_size * T, generated, _notes(model_cfg))


def _kv_cache_bytes(model_cfg, device_mesh, slots: int, cache_len: int, dtype: str) -> int:
    """The engine's decode caches of every slot, per chip (rows over the batch axes)."""
    import jax

    from openr1_jax.models.kv_cache import init_layer_cache
    from openr1_jax.sharding.rules import DEFAULT_RULES, named_sharding

    attn = model_cfg.attention_config()
    layer = jax.eval_shape(lambda: init_layer_cache(attn, slots, cache_len, dtype))
    per_layer = 0
    for a in jax.tree.leaves(layer):
        sharding = named_sharding(("batch",) + (None,) * (a.ndim - 1), device_mesh, DEFAULT_RULES, a.shape)
        per_layer += math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize
    return per_layer * model_cfg.num_hidden_layers


PLANNERS = {"sft": plan_sft, "grpo": plan_grpo}


def candidate_meshes(model_cfg, chips: int, limit: int = 8):
    """Mesh layouts whose axes multiply to `chips`: fsdp takes the rest after tensor (heads), expert (routed
    experts) and data; tensor and expert only where they divide what they split. Most-fsdp first."""
    from openr1_jax.sharding.mesh import MeshConfig

    heads = model_cfg.kv_heads if not model_cfg.is_mla else model_cfg.num_attention_heads
    powers = [2**i for i in range(chips.bit_length()) if chips % 2**i == 0]
    found = []
    for tensor, expert, data in itertools.product(powers, powers, powers):
        if chips % (tensor * expert * data) or heads % tensor:
            continue
        if expert > 1 and (not model_cfg.is_moe or model_cfg.n_routed_experts % expert):
            continue
        found.append(MeshConfig(data=data, fsdp=chips // (tensor * expert * data), expert=expert, tensor=tensor))
    found.sort(key=lambda m: (m.tensor, m.data, m.expert))
    return found[:limit]


def search(recipe: str, cfg, topology: str, limit: int = 8, depth: str = "auto") -> list[Plan]:
    """Plans for the candidate meshes, those that fit first, fastest first."""
    from openr1_jax.train.sft import resolve_model

    topo = parse_topology(topology)
    model_cfg, _ = resolve_model(cfg.model)
    planner = PLANNERS[recipe]
    plans = [planner(cfg, topo, mesh, depth) for mesh in candidate_meshes(model_cfg, topo.chips, limit)]
    return sorted(plans, key=lambda p: (not p.fits, p.step_seconds or float("inf")))


__all__ = ["PLANNERS", "candidate_meshes", "plan_grpo", "plan_sft", "search"]
