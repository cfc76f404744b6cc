"""`openr1-jax plan`: will a training job fit on a TPU slice, and how fast will it run - answered on a machine
without TPUs, before a day of a v5p-512 is spent.

With libtpu installed, `jax.experimental.topologies` describes the slice's chips and libtpu's compiler compiles
the real sharded SFT train step for them from shapes alone (`train/aot.py`). Per chip the plan reports:

  parameters, optimizer state, gradients      from the train state's shardings (exact)
  activations and temporaries                 the compiled temporaries minus the gradient accumulators
  total                                       arguments + outputs + temporaries - donated, against the chip's HBM
  step time                                   roofline: max(compiled FLOPs / peak, compiled bytes / HBM bandwidth)
  MFU, tokens/s/chip                          model FLOPs (train/flops.py) over that step time

The roofline ignores collectives and assumes every op runs at the chip's peak or its bandwidth, so it is an
optimistic bound, useful to compare layouts and to catch what cannot work, not a promise.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from openr1_jax.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    cores_per_chip: int  # the slice name counts TensorCores on v5p (2 per chip), chips on v5e/v6e


CHIPS = {
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 2),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 1),
}
# chips -> the physical grid that jax's topology description takes (v5e/v6e: 2-D, v5p: 3-D torus)
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}


@dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p-512"
    chip: Chip
    chips: int
    grid: str  # e.g. "v5p:4x8x8"

    def devices(self):
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            raise UserError("planning for TPUs needs libtpu: pip install 'openr1-jax[tpu]' (no TPU is needed)")
        return topologies.get_topology_desc(platform="tpu", topology_name=self.grid).devices


def parse_topology(name: str) -> Topology:
    """ "v5p-512" (TensorCores), "v5e-8" / "v5litepod-8" / "v6e-256" (chips)."""
    m = re.fullmatch(r"(v5e|v5litepod|v5p|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise UserError(f"--topology '{name}' is not a TPU slice like v5p-512, v5e-8 or v6e-256")
    chip = CHIPS["v5e" if m[1] == "v5litepod" else m[1]]
    count = int(m[2])
    grids = GRID_3D if chip.name == "v5p" else GRID_2D
    chips = count // chip.cores_per_chip
    if count % chip.cores_per_chip or chips not in grids:
        sizes = ", ".join(f"{chip.name}-{c * chip.cores_per_chip}" for c in grids)
        raise UserError(f"--topology '{name}' is not a {chip.name} slice size this planner knows ({sizes})")
    return Topology(name, chip, chips, f"{chip.name}:{grids[chips]}")


@dataclass(frozen=True)
class Plan:
    topology: Topology
    mesh: dict[str, int]
    tokens_per_step: int
    params: int  # bytes per chip
    optimizer: int
    gradients: int
    activations: int | None  # None: the compiler ran out of memory before it could say
    total: int | None
    compiled_flops: float | None  # per chip
    compiled_bytes: float | None
    model_flops: float  # per chip per step, the 6N + attention count MFU is quoted in
    error: str | None = None

    @property
    def fits(self) -> bool:
        return self.total is not None and self.total <= self.topology.chip.hbm_bytes

    @property
    def step_seconds(self) -> float | None:
        if self.compiled_flops is None:
            return None
        chip = self.topology.chip
        return max(self.compiled_flops / chip.peak_flops, self.compiled_bytes / chip.hbm_bandwidth)

    @property
    def mfu(self) -> float | None:
        t = self.step_seconds
        return None if not t else self.model_flops / (t * self.topology.chip.peak_flops)

    @property
    def tokens_per_sec_per_chip(self) -> float | None:
        t = self.step_seconds
        return None if not t else self.tokens_per_step / t / self.topology.chips

    def largest_consumer(self) -> tuple[str, int]:
        parts = {
            "parameters": self.params,
            "optimizer state": self.optimizer,
            "gradients": self.gradients,
            "activations and temporaries": self.activations or 0,
        }
        return max(parts.items(), key=lambda kv: kv[1])


def plan_sft(cfg, topology: str | Topology, mesh=None) -> Plan:
    """Compile `cfg`'s (an SFTConfig) train step for the slice with `mesh` (default: the config's)."""
    from openr1_jax.sharding.mesh import MESH_AXES, make_mesh
    from openr1_jax.train import flops
    from openr1_jax.train.aot import StepTooLarge, compile_sft_step
    from openr1_jax.train.sft import resolve_model

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    mesh_cfg = mesh or cfg.mesh
    model_cfg, _ = resolve_model(cfg.model)
    device_mesh = make_mesh(mesh_cfg, topo.devices())
    B, T = cfg.batch_size, cfg.data.seq_len
    model_flops = flops.flops_per_token(model_cfg, T, with_mtp=cfg.training.mtp_loss_weight > 0) * B * T / topo.chips
    sizes = {a: int(device_mesh.shape[a]) for a in MESH_AXES}
    common = dict(topology=topo, mesh=sizes, tokens_per_step=B * T, model_flops=model_flops)
    try:
        step = compile_sft_step(
            model_cfg,
            device_mesh,
            batch_size=B,
            seq_len=T,
            dtype=cfg.model.dtype,
            param_dtype=cfg.model.param_dtype,
            step=cfg.training,
            optimizer=cfg.optimizer,
        )
    except StepTooLarge as e:
        s = e.state
        return Plan(
            **common,
            params=s.params,
            optimizer=s.optimizer,
            gradients=s.gradients,
            activations=None,
            total=None,
            compiled_flops=None,
            compiled_bytes=None,
            error=str(e),
        )
    s = step.state
    return Plan(
        **common,
        params=s.params,
        optimizer=s.optimizer,
        gradients=s.gradients,
        activations=max(step.memory["temp"] - s.gradients, 0),
        total=step.peak_bytes,
        compiled_flops=step.flops,
        compiled_bytes=step.bytes_accessed,
    )


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


def search_sft(cfg, topology: str, limit: int = 8) -> list[Plan]:
    """Plans for the candidate meshes, those that fit first, fastest first."""
    from openr1_jax.train.sft import resolve_model

    topo = parse_topology(topology)
    model_cfg, _ = resolve_model(cfg.model)
    plans = [plan_sft(cfg, topo, mesh) for mesh in candidate_meshes(model_cfg, topo.chips, limit)]
    return sorted(plans, key=lambda p: (not p.fits, p.step_seconds or float("inf")))


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def mesh_text(mesh: dict[str, int]) -> str:
    return " x ".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "1 chip"


def format_plan(plan: Plan) -> str:
    topo, chip = plan.topology, plan.topology.chip
    lines = [
        f"{topo.name}: {topo.chips} chips of {chip.name} ({chip.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16), mesh {mesh_text(plan.mesh)}, {plan.tokens_per_step} tokens/step",
        "per chip:",
        f"  parameters                   {_gib(plan.params)}",
        f"  optimizer state              {_gib(plan.optimizer)}",
        f"  gradients (fp32)             {_gib(plan.gradients)}",
        f"  activations and temporaries  {_gib(plan.activations)}",
        f"  total                        {_gib(plan.total)} of {_gib(chip.hbm_bytes)}"
        + ("" if plan.fits else "  DOES NOT FIT"),
    ]
    if plan.step_seconds is not None:
        lines += [
            f"  FLOPs per step               {plan.compiled_flops:.3e} compiled, {plan.model_flops:.3e} model",
            f"  step time (roofline)         {plan.step_seconds * 1e3:.1f} ms",
            f"  MFU (roofline)               {100 * plan.mfu:.1f}%",
            f"  tokens/s/chip (roofline)     {plan.tokens_per_sec_per_chip:.0f}",
        ]
    if plan.error:
        lines.append(f"  compiler: {plan.error}")
    return "\n".join(lines)


def check_fits(plan: Plan) -> None:
    """One sentence naming the largest consumer when the plan does not fit."""
    if plan.fits:
        return
    what, size = plan.largest_consumer()
    total = "more than the HBM" if plan.total is None else _gib(plan.total)
    raise UserError(
        f"the step does not fit on {plan.topology.name} with mesh {mesh_text(plan.mesh)}: it needs {total} per chip "
        f"against {_gib(plan.topology.chip.hbm_bytes)}, the largest part being {what} ({_gib(size)} per chip); "
        "try --search, a larger slice, remat, or a smaller batch"
    )


def run_plan(config: str | None, overrides: list[str], topology: str, mesh: str | None, search: bool) -> str:
    """The `openr1-jax plan` command: the report as text (raises UserError when nothing fits)."""
    from openr1_jax.sharding.mesh import MeshConfig
    from openr1_jax.train.config import load_sft_config

    cfg = load_sft_config(config, overrides)
    parse_topology(topology)  # a bad name fails before any model is built
    if search:
        plans = search_sft(cfg, topology)
        rows = [_search_row(p) for p in plans]
        if not any(p.fits for p in plans):
            check_fits(plans[0])
        return f"{topology}: {len(plans)} mesh layouts, best first\n" + "\n".join(rows) + "\n\n" + format_plan(plans[0])
    mesh_cfg = _parse_mesh(mesh, MeshConfig) if mesh else None
    plan = plan_sft(cfg, topology, mesh_cfg)
    report = format_plan(plan)
    check_fits(plan)
    return report


def _search_row(p: Plan) -> str:
    row = f"{mesh_text(p.mesh):40s} {_gib(p.total):>12s} {'fits' if p.fits else 'too big':8s}"
    if p.step_seconds is not None:
        row += f" {p.step_seconds * 1e3:9.1f} ms {p.tokens_per_sec_per_chip:8.0f} tokens/s/chip"
    return row


def _parse_mesh(text: str, mesh_cls):
    """ "fsdp=64,tensor=4" -> MeshConfig (unnamed axes keep their defaults: data 1, fsdp -1, expert 1, tensor 1)."""
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise UserError(f"--mesh '{text}': expected AXIS=SIZE pairs like fsdp=64,tensor=4")
        values[key.strip()] = int(value)
    try:
        return mesh_cls(**values)
    except TypeError:
        raise UserError(f"--mesh '{text}': axes are data, fsdp, expert, tensor (and dcn_*)") from None
