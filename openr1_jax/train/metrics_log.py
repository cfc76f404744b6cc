"""Training metrics: JSONL (always), TensorBoard, Weights & Biases, a tqdm progress bar.

Only the main process writes. Values may be jax arrays: they are turned into floats here, at log time, so the
loop keeps dispatching step n before it hands over step n-1's metrics (the float() then waits only for a
step that is already done). On resume, records past the resumed step are dropped from the JSONL files and
TensorBoard is told to purge them, so every file reads as one consistent run.

(Named metrics_log rather than logging so nothing can ever shadow the standard library module.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.fileio import atomic_file

REPORTERS = ("jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
BAR_KEYS = ("loss", "tokens_per_sec")  # shown in the progress bar when present


@dataclass(frozen=True)
class LoggingConfig:
    """Where and how often training metrics go."""

    logging_steps: int = field(default=10, metadata={"help": "log metrics every N optimizer steps"})
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        metadata={"help": "sinks among jsonl, tensorboard, wandb (jsonl is always written)"},
    )
    wandb_project: str | None = field(default=None, metadata={"help": "Weights & Biases project (report_to wandb)"})
    run_name: str | None = field(default=None, metadata={"help": "run name shown by wandb; default: output dir name"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar on the main process"})

    def __post_init__(self):
        if self.logging_steps < 1:
            raise UserError(f"logging.logging_steps must be >= 1, got {self.logging_steps}")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise UserError(f"logging.report_to has unknown sink(s) {unknown}; allowed: {list(REPORTERS)}")


def _scalar(value: Any) -> float:
    return float(value)  # jax/numpy scalars: blocks only until that value is computed


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop records with step > keep_through_step (and a torn last line from a crash); rewrite atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= keep_through_step:
            kept.append(line + "\n")
    with atomic_file(path) as tmp:
        tmp.write_text("".join(kept))


class MetricsLogger:
    """Writes `<output_dir>/metrics.jsonl`, `<output_dir>/tensorboard/`, wandb; drives the progress bar.

    `start_step` is the step the run resumes from (0 for a fresh run): records of later steps already on
    disk belong to the abandoned tail of the previous attempt and are removed.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        cfg: LoggingConfig = LoggingConfig(),
        total_steps: int | None = None,
        config_dict: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        start_step: int = 0,
    ):
        self.cfg = cfg
        self.total_steps = total_steps
        self.output_dir = Path(output_dir)
        self.enabled = is_main_process
        self._tb = self._wandb = self._bar = None
        self._metrics_file = self._samples_file = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):  # a fresh run (start_step 0) starts the files over
            _truncate_jsonl(self.output_dir / name, start_step if start_step > 0 else -1)
        # Line-buffered: every record reaches the OS as soon as it is logged, so a kill loses nothing logged.
        self._metrics_file = open(self.output_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 (closed in close())
        if "tensorboard" in cfg.report_to:
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard discard events at steps >= it from earlier attempts.
            self._tb = SummaryWriter(
                str(self.output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )
        if "wandb" in cfg.report_to:
            self._wandb = self._init_wandb(dict(config_dict or {}))
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _init_wandb(self, config_dict: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "logging.report_to includes wandb but the wandb package is not installed; "
                "pip install 'openr1-jax[wandb]' or remove wandb from logging.report_to"
            ) from None
        # Keep the run id beside the outputs so a resumed job continues the same wandb run.
        id_file = self.output_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.run_name or self.output_dir.name,
            id=run_id,
            resume="allow",
            config=config_dict,
            dir=str(self.output_dir),
        )

    # ------------------------------------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """True every `logging_steps` steps and at the last step."""
        return step % self.cfg.logging_steps == 0 or step == self.total_steps

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalar metrics of `step` in every sink."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": int(step), **values, "time": round(time.time(), 3)}
        self._metrics_file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Record a text sample (e.g. a GRPO completion): TensorBoard text and `<output_dir>/samples.jsonl`."""
        if not self.enabled:
            return
        if self._samples_file is None:
            self._samples_file = open(self.output_dir / SAMPLES_FILE, "a", buffering=1)  # noqa: SIM115
        self._samples_file.write(json.dumps({"step": int(step), "tag": tag, "text": text}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move the progress bar to `step` and show loss and tokens/s when given."""
        if self._bar is None:
            return
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        shown = {k: f"{_scalar(metrics[k]):.4g}" for k in BAR_KEYS if metrics and k in metrics}
        if shown:
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        for f in (self._metrics_file, self._samples_file):
            if f is not None:
                f.close()
        self._tb = self._wandb = self._bar = self._metrics_file = self._samples_file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
