"""A sweep's comparison plots: final.png (each metric per arm: every seed as a dot, the mean with a +-std bar) and
curves.png (each curve key against the step: per arm the mean over seeds with a min-max band)."""

from __future__ import annotations

import math
from pathlib import Path

# A bare Figure renders with the Agg canvas and never touches pyplot's global backend or a display.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from openr1_jax.ablate.config import SweepConfig
from openr1_jax.fileio import atomic_file
from openr1_jax.train.plot import read_metrics

COLUMNS = 2


def _grid(panels: int, width: float, height: float):
    cols = min(COLUMNS, max(panels, 1))
    rows = math.ceil(max(panels, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_axis_off()
    return fig, axes[:panels]


def plot_bars(cfg: SweepConfig, rows: list[dict], values: dict, out_png: Path) -> Path:
    arms = [row["arm"] for row in rows]
    fig, axes = _grid(len(cfg.metrics), 5.5, 3.2 + 0.08 * max(len(a) for a in arms))
    for ax, metric in zip(axes, cfg.metrics):
        # Dots and a mean marker, not bars: a bar starts at zero, which hides the small gaps between arms.
        for i, row in enumerate(rows):
            summary = row["metrics"][metric.label]
            dots = [values[row["arm"], s][metric.label] for s in row["seeds"]]
            dots = [d for d in dots if d is not None]
            ax.scatter([i] * len(dots), dots, color="0.55", s=14, zorder=2)
            if summary["mean"] is not None:
                ax.errorbar(i + 0.12, summary["mean"], yerr=summary["std"] or 0.0, fmt="o", color="tab:blue", capsize=4)
        ax.set_xlim(-0.5, len(arms) - 0.5)
        ax.set_title(metric.label, fontsize="medium")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_curves(cfg: SweepConfig, finished, out_png: Path) -> Path:
    keys = cfg.curve_keys
    fig, axes = _grid(len(keys), 5.5, 3.4)
    records = {(r.arm, r.seed): read_metrics(r.out / "metrics.jsonl") for r in finished}
    for ax, key in zip(axes, keys):
        for arm in cfg.expand_arms():
            per_seed = [
                {row["step"]: row[key] for row in records[arm.name, s] if key in row and "step" in row}
                for s in cfg.seeds
                if (arm.name, s) in records
            ]
            per_seed = [points for points in per_seed if points]
            if not per_seed:
                continue
            # Steps every seed logged: a band over fewer seeds than the line would hide missing data.
            steps = sorted(set.intersection(*(set(points) for points in per_seed)))
            at = [[points[t] for points in per_seed] for t in steps]
            (line,) = ax.plot(steps, [sum(v) / len(v) for v in at], label=arm.name, linewidth=1.2)
            if len(per_seed) > 1:
                ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=line.get_color(), alpha=0.2)
        low, high = ax.dataLim.intervaly
        if ax.lines and low > 0 and high / low > 100:  # a loss falling to ~0: arms differ in the last decades
            ax.set_yscale("log")
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig: Figure, out_png: Path) -> Path:
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return out_png
