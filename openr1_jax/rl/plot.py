"""End-of-run PNG of a GRPO run: rewards per function, held-out accuracy, completion length, KL/entropy."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from openr1_jax.train.plot import read_metrics


def plot_rewards(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """One panel each for the reward means, held-out accuracy and format rate, completion length and
    entropy/KL; panels without data are left out. Returns the PNG path."""
    records = read_metrics(metrics_jsonl)
    present = sorted({k for r in records for k in r})
    panels = [
        ([k for k in present if k.startswith("rewards/") and k.endswith("/mean")] + ["reward"], "reward"),
        (["eval/accuracy", "eval/format_rate"], "held-out"),
        (["completions/mean_length"], "completion tokens"),
        (["entropy", "kl"], "entropy / KL"),
    ]
    panels = [([k for k in keys if k in present], title) for keys, title in panels]
    panels = [(keys, title) for keys, title in panels if keys]
    fig = Figure(figsize=(8, 2.6 * max(len(panels), 1)))
    axes = list(fig.subplots(max(len(panels), 1), 1, sharex=True, squeeze=False)[:, 0])
    for ax, (keys, title) in zip(axes, panels, strict=False):
        for key in keys:
            pairs = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(
                [p for p, _ in pairs],
                [v for _, v in pairs],
                label=key,
                linewidth=1.2,
                marker="." if key.startswith("eval/") else None,
            )
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
