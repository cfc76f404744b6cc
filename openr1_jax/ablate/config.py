"""The sweep file of `openr1-jax ablate`: a base recipe, its arms (a list and/or a grid), seeds, the table's metrics.

    name: moe-balancing              # default: the file's name
    recipe: sft                      # sft or grpo: whose runner trains every arm
    base: default                    # that recipe's YAML file or recipe name
    overrides: {max_steps: 300}      # dotted recipe keys every arm shares
    seeds: [0, 1, 2]                 # every arm runs once per seed (the recipe's `seed`)
    arms:                            # named arms ...
      - {name: baseline}
      - {name: no-mtp, overrides: {training.mtp_loss_weight: 0}}
    grid: {loss_type: [grpo, dapo]}  # ... and/or the cartesian product of a grid (arm "loss_type=grpo", ...)
    metrics:                         # table columns: a key of metrics.jsonl or eval.json, reduced over the run
      - {key: main_loss, reduce: final}
    curves: [main_loss]              # metrics.jsonl keys drawn against the step (default: the metrics' keys)
    output_dir: runs/ablate/NAME     # the runs (checkpoints and all)
    results_dir: null                # results.md/.csv and the plots (default: output_dir)

Everything is checked when the file loads, each arm's recipe config included, so a typo costs one sentence
before any run starts instead of a failed arm hours into a sweep.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from openr1_jax.errors import UserError
from openr1_jax.models.presets import config_dir
from openr1_jax.structured import apply_overrides, from_dict, read_yaml
from openr1_jax.train.config import resolve_recipe

SWEEP_DIR = config_dir("ablate")
RUNNER_KEYS = ("seed", "output_dir")  # the runner sets these per run; a sweep may not
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*")  # a folder name on any filesystem, no spaces


@dataclass(frozen=True)
class ArmSection:
    name: str = field(default="", metadata={"help": "the arm's name (its folder under output_dir/runs)"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "dotted recipe keys this arm changes, e.g. {beta: 0.04}"}
    )

    def __post_init__(self) -> None:
        if not ARM_NAME.fullmatch(self.name):
            raise UserError(f"arm name '{self.name}' must be letters, digits and . _ = , + - (no spaces or slashes)")


@dataclass(frozen=True)
class MetricSection:
    key: str = field(default="", metadata={"help": "a key of the runs' metrics.jsonl rows or eval.json"})
    source: Literal["metrics", "eval"] = field(
        default="metrics", metadata={"help": "metrics.jsonl (training log) or eval.json (held-out evaluation)"}
    )
    reduce: Literal["final", "min", "max", "mean"] = field(
        default="final", metadata={"help": "one number per run: the last value, the best (min/max) or the mean"}
    )
    name: str | None = field(default=None, metadata={"help": "column title (default: '<reduce> <key>')"})

    def __post_init__(self) -> None:
        if not self.key:
            raise UserError("every metric needs a key (e.g. {key: loss, reduce: final})")

    @property
    def label(self) -> str:
        return self.name or f"{self.reduce} {self.key}"


@dataclass(frozen=True)
class SweepConfig:
    name: str = field(default="", metadata={"help": "the sweep's name (default: the file's name)"})
    recipe: Literal["sft", "grpo"] | None = field(default=None, metadata={"help": "sft or grpo"})
    base: str = field(default="default", metadata={"help": "the recipe's YAML file or recipe name"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "dotted recipe keys every arm shares"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "one run per arm and seed"})
    arms: list[ArmSection] = field(default_factory=list, metadata={"help": "named arms"})
    grid: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "dotted key -> list of values; every combination is an arm"}
    )
    metrics: list[MetricSection] = field(default_factory=list, metadata={"help": "the results table's columns"})
    curves: list[str] | None = field(
        default=None, metadata={"help": "metrics.jsonl keys plotted against the step (default: the metrics' keys)"}
    )
    output_dir: str | None = field(default=None, metadata={"help": "the runs' folder (default: runs/ablate/NAME)"})
    results_dir: str | None = field(
        default=None, metadata={"help": "results.md, results.csv, runs.csv and plots (default: output_dir)"}
    )

    def __post_init__(self) -> None:
        if self.recipe is None:
            raise UserError("'recipe' is required (sft or grpo)")
        if not ARM_NAME.fullmatch(self.name):
            raise UserError(f"name '{self.name}' must be letters, digits and . _ = , + - (no spaces or slashes)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"'seeds' must be a non-empty list of distinct integers, not {self.seeds}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"'grid.{key}' must be a non-empty list of values")
        if not self.arms and not self.grid:
            raise UserError("the sweep has no arms: give 'arms' (a list) and/or 'grid'")
        names = [arm.name for arm in self.expand_arms()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"arm name '{duplicates[0]}' appears twice (arms and grid arms share one namespace)")
        runner_set = [k for a in self.expand_arms() for k in a.overrides if k.split(".")[0] in RUNNER_KEYS]
        runner_set += [k for k in flatten(self.overrides) if k.split(".")[0] in RUNNER_KEYS]
        if runner_set:
            raise UserError(f"overrides may not set '{runner_set[0]}': the runner sets seed and output_dir per run")
        if not self.metrics:
            raise UserError("'metrics' is empty: name at least one column, e.g. {key: loss, reduce: final}")
        labels = [m.label for m in self.metrics]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise UserError(f"two metrics have the column title '{twice[0]}': give one a 'name'")

    def expand_arms(self) -> list[ArmSection]:
        """The named arms, then one arm per grid combination (named `key=value,...` by the keys' last parts)."""
        arms = [ArmSection(a.name, flatten(a.overrides)) for a in self.arms]
        keys = list(self.grid)
        for values in itertools.product(*(self.grid[k] for k in keys)) if keys else ():
            name = ",".join(f"{k.rsplit('.', 1)[-1]}={_show(v)}" for k, v in zip(keys, values))
            arms.append(ArmSection(name, dict(zip(keys, values))))
        return arms

    @property
    def runs_root(self) -> Path:
        return Path(self.output_dir or f"runs/ablate/{self.name}").expanduser().absolute()

    @property
    def results_root(self) -> Path:
        return Path(self.results_dir).expanduser().absolute() if self.results_dir else self.runs_root

    @property
    def curve_keys(self) -> list[str]:
        if self.curves is not None:
            return list(self.curves)
        return list(dict.fromkeys(m.key for m in self.metrics if m.source == "metrics"))


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{training: {x: 1}} -> {"training.x": 1}: nested mappings merge into the recipe key by key instead of
    replacing a whole section (an empty mapping stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def override_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted mapping -> the recipe CLI's `key=value` words, each value reading back (as YAML) as itself."""
    return [f"{key}={_word(value)}" for key, value in flatten(overrides).items()]


def _word(value: Any) -> str:
    """A string as it is where YAML reads it back unchanged (`tiny-moe`), else JSON, which YAML reads exactly."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def arm_args(cfg: SweepConfig, arm: ArmSection) -> list[str]:
    """The recipe overrides of one arm (its own after the common ones, so the arm's win), seed and output aside."""
    return [*override_args(cfg.overrides), *override_args(arm.overrides), "logging.progress_bar=false"]


def load_recipe_config(recipe: str, base: str, args: list[str]):
    if recipe == "sft":
        from openr1_jax.train.config import load_sft_config

        return load_sft_config(base, args)
    from openr1_jax.rl.config import load_grpo_config

    return load_grpo_config(base, args)


def load_sweep_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """A sweep file (or a name in configs/ablate) plus dotted overrides of the sweep file itself, with every
    arm's recipe config loaded once to prove it valid."""
    path = resolve_recipe(name_or_path, SWEEP_DIR)
    data = read_yaml(path, "sweep file")
    data.setdefault("name", path.stem)
    source = f"sweep file '{path}'"
    if overrides:
        data = apply_overrides(data, overrides, SweepConfig)
        source += " (with overrides)"
    cfg = from_dict(SweepConfig, data, source)
    for arm in cfg.expand_arms():
        args = [*arm_args(cfg, arm), f"seed={cfg.seeds[0]}", f"output_dir={cfg.runs_root / 'check'}"]
        try:
            load_recipe_config(cfg.recipe, cfg.base, args)
        except UserError as err:
            raise UserError(f"arm '{arm.name}' of {source}: {err}") from None
    return cfg


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
