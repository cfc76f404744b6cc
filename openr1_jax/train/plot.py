"""End-of-run PNG of the training curves read back from metrics.jsonl."""

from __future__ import annotations

import json
import os
from pathlib import Path

# A bare Figure renders with the Agg canvas and never touches pyplot's global backend or a display.
from matplotlib.figure import Figure

LOSS_KEYS = ("loss", "main_loss", "mtp_loss")
LR_KEY = "learning_rate"
GRAD_NORM_KEY = "grad_norm"


def read_metrics(metrics_jsonl: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl, skipping a torn last line."""
    records = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_metrics(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: tuple[str, ...] = LOSS_KEYS,
) -> Path:
    """Plot loss curves (`keys`, plus per-depth `<key>_<k>` variants such as mtp_loss_1), learning rate and
    grad norm, one panel each; panels without data are left out. Returns the PNG path."""
    records = read_metrics(metrics_jsonl)
    present = {k for r in records for k in r}
    loss_keys = [k for k in keys if k in present]
    loss_keys += sorted(k for k in present if k not in loss_keys and any(k.startswith(f"{b}_") for b in keys))
    panels = [(loss_keys, "loss")]
    panels += [([k], k.replace("_", " ")) for k in (LR_KEY, GRAD_NORM_KEY) if k in present]
    panels = [(ks, title) for ks, title in panels if ks]

    n = max(len(panels), 1)
    fig = Figure(figsize=(8, 2.8 * n))
    axes = list(fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0])
    if not panels:
        axes[0].text(0.5, 0.5, f"no metrics among {list(keys)} in {metrics_jsonl}", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (panel_keys, title) in zip(axes, panels, strict=False):
        for k in panel_keys:
            steps, values = _series(records, k)
            ax.plot(steps, values, label=k, linewidth=1.2)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(panel_keys) > 1:
            ax.legend(loc="upper right", fontsize="small")
        if title == LR_KEY.replace("_", " "):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
