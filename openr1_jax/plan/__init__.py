"""`openr1-jax plan`: will a training job fit on a TPU slice, and how fast will it run - answered on a machine
without TPUs, before a day of a v5p-512 is spent.

With libtpu installed, `jax.experimental.topologies` describes the slice's chips and libtpu's compiler compiles
the job's real sharded programs for them from shapes alone (`train/aot.py`): the SFT train step; the GRPO train
step, rollout decode step and reference log-probs. `estimate.py` turns their memory and cost analyses into
per-chip memory against HBM and a roofline step time, MFU and tokens/s/chip; `recipes.py` says which programs
a recipe runs and how often; `report.py` prints it. Presets (configs/plan/*.yaml) name a recipe config,
overrides, a slice and a mesh, so `openr1-jax plan deepseek-v3-671b-sft-v5p-512` needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.plan.estimate import Plan, ProgramPlan
from openr1_jax.plan.recipes import PLANNERS, candidate_meshes, plan_grpo, plan_sft, search
from openr1_jax.plan.report import check_fits, format_plan, presets_table, search_row
from openr1_jax.plan.topology import CHIPS, Topology, parse_topology
from openr1_jax.sharding.mesh import MeshConfig
from openr1_jax.structured import load_config

PRESET_DIR = config_dir("plan")
DEPTHS = ("auto", "full", "sampled")


@dataclass(frozen=True)
class PlanPreset:
    """A plan worth keeping: configs/plan/<name>.yaml."""

    recipe: Literal["sft", "grpo"] = field(metadata={"help": "which job: sft or grpo"})
    topology: str = field(metadata={"help": "TPU slice, e.g. v5p-512"})
    config: str = field(default="default", metadata={"help": "the recipe config the overrides apply to"})
    mesh: MeshConfig | None = field(default=None, metadata={"help": "mesh axes (default: the config's)"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "KEY=VALUE overrides of the recipe config"})

    def __post_init__(self) -> None:
        if self.recipe not in PLANNERS:
            raise UserError(f"recipe '{self.recipe}' is not one of {sorted(PLANNERS)}")
        parse_topology(self.topology)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> PlanPreset:
    return load_config(PlanPreset, PRESET_DIR / f"{name}.yaml", what="plan preset")


def load_recipe_config(recipe: str, config: str | None, overrides: list[str]):
    if recipe == "grpo":
        from openr1_jax.rl.config import load_grpo_config

        return load_grpo_config(config, overrides)
    from openr1_jax.train.config import load_sft_config

    return load_sft_config(config, overrides)


def run_plan(
    config: str | None,
    overrides: list[str],
    topology: str | None,
    mesh: str | None = None,
    search_meshes: bool = False,
    recipe: str = "sft",
    depth: str = "auto",
) -> None:
    """The `openr1-jax plan` command: prints the report, then raises UserError if the job does not fit.
    `config` is a plan preset name or a recipe config (name or YAML) of `recipe`."""
    if depth not in DEPTHS:
        raise UserError(f"--depth '{depth}' is not one of {', '.join(DEPTHS)}")
    mesh_cfg = _parse_mesh(mesh) if mesh else None
    if config in preset_names():
        preset = load_preset(config)
        recipe, topology = preset.recipe, topology or preset.topology
        mesh_cfg = mesh_cfg or preset.mesh
        config, overrides = preset.config, [*preset.overrides, *overrides]
    if topology is None:
        raise UserError(f"--topology is needed unless CONFIG is a plan preset ({', '.join(preset_names())})")
    parse_topology(topology)  # a bad name fails before any model is built
    cfg = load_recipe_config(recipe, config, overrides)
    if search_meshes:
        plans = search(recipe, cfg, topology, depth=depth)
        rows = [search_row(p) for p in plans]
        print(f"{topology}: {len(plans)} mesh layouts, best first\n" + "\n".join(rows) + "\n\n" + format_plan(plans[0]))
        check_fits(plans[0])
        return
    plan = PLANNERS[recipe](cfg, topology, mesh_cfg, depth)
    print(format_plan(plan), flush=True)
    check_fits(plan)


def plan_preset(name: str, depth: str = "auto") -> Plan:
    preset = load_preset(name)
    cfg = load_recipe_config(preset.recipe, preset.config, preset.overrides)
    return PLANNERS[preset.recipe](cfg, preset.topology, preset.mesh, depth)


def run_presets(names: list[str] | None = None, depth: str = "auto") -> str:
    """`openr1-jax plan --presets`: every preset planned (each report printed as it comes), then a Markdown table."""
    import jax

    rows = []
    for name in names or preset_names():
        plan = plan_preset(name, depth)
        print(f"## {name}\n{format_plan(plan)}\n", flush=True)
        rows.append((name, plan))
        jax.clear_caches()  # the next preset's programs need the memory more than a cache hit
    return presets_table(rows)


def _parse_mesh(text: str) -> MeshConfig:
    """ "fsdp=64,tensor=4" -> MeshConfig (unnamed axes keep their defaults: data 1, fsdp -1, expert 1, tensor 1)."""
    values = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise UserError(f"--mesh '{text}': expected AXIS=SIZE pairs like fsdp=64,tensor=4")
        values[key.strip()] = int(value)
    try:
        return MeshConfig(**values)
    except TypeError:
        raise UserError(f"--mesh '{text}': axes are data, fsdp, expert, tensor (and dcn_*)") from None


__all__ = [
    "CHIPS",
    "Plan",
    "PlanPreset",
    "ProgramPlan",
    "Topology",
    "candidate_meshes",
    "check_fits",
    "format_plan",
    "load_preset",
    "parse_topology",
    "plan_grpo",
    "plan_preset",
    "plan_sft",
    "preset_names",
    "run_plan",
    "run_presets",
    "search",
]
