"""Metrics logging (JSONL, TensorBoard, progress bar, resume truncation) and the end-of-run plot."""

import importlib.util
import io
import json
import struct
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from openr1_jax.errors import UserError
from openr1_jax.train.metrics_log import LoggingConfig, MetricsLogger
from openr1_jax.train.plot import plot_metrics, read_metrics


def _read_events(tb_dir: Path) -> list[event_pb2.Event]:
    """Parse TFRecord event files: [u64 length][u32 crc][payload][u32 crc] per record."""
    events = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def _scalars(events) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_config_validation():
    assert LoggingConfig().report_to == ["jsonl", "tensorboard"]
    with pytest.raises(UserError, match="report_to"):
        LoggingConfig(report_to=["jsonl", "mlflow"])
    with pytest.raises(UserError, match="logging_steps"):
        LoggingConfig(logging_steps=0)


def test_jsonl_tensorboard_text_and_resume_truncation(tmp_path):
    cfg = LoggingConfig(logging_steps=2, progress_bar=False)
    with MetricsLogger(tmp_path, cfg, total_steps=7, config_dict={"lr": 1e-3}) as logger:
        assert [s for s in range(1, 8) if logger.is_due(s)] == [2, 4, 6, 7]
        for step in (2, 4, 6):
            logger.log(step, {"loss": jnp.asarray(10.0 - step), "learning_rate": np.float32(1e-3 * step)})
        logger.log_text(4, "completions", "<think>2+2</think> 4")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["loss"] for r in records] == [8.0, 6.0, 4.0]
    assert records[1]["learning_rate"] == pytest.approx(4e-3)
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == {
        "step": 4,
        "tag": "completions",
        "text": "<think>2+2</think> 4",
    }
    events = _read_events(tmp_path / "tensorboard")
    assert _scalars(events)["train/loss"] == [(2, 8.0), (4, 6.0), (6, 4.0)]
    assert any(v.tag.startswith("completions") for e in events for v in e.summary.value if e.step == 4)

    # Resume from the checkpoint of step 4: the step-6 record (and a torn line from a kill) must go.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with MetricsLogger(tmp_path, cfg, total_steps=7, start_step=4) as logger:
        logger.log(6, {"loss": 3.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(2, 8), (4, 6), (6, 3.5)]
    assert all(json.loads(line)["step"] <= 4 for line in (tmp_path / "samples.jsonl").read_text().splitlines())
    purge = [e for e in _read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert [(e.session_log.status, e.step) for e in purge] == [(event_pb2.SessionLog.START, 5)]

    # A fresh run (start_step 0) in the same folder starts the JSONL over.
    MetricsLogger(tmp_path, LoggingConfig(report_to=["jsonl"], progress_bar=False)).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_only_main_process_writes(tmp_path):
    with MetricsLogger(tmp_path / "out", LoggingConfig(), total_steps=3, is_main_process=False) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log_text(1, "t", "x")
        logger.update(1, {"loss": 1.0})
    assert not (tmp_path / "out").exists()


def test_progress_bar_shows_loss_and_throughput(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with MetricsLogger(tmp_path, LoggingConfig(report_to=["jsonl"]), total_steps=10, start_step=2) as logger:
        logger.update(5, {"loss": jnp.asarray(1.25), "tokens_per_sec": 4096.0})
        logger._bar.refresh()
        assert logger._bar.n == 5
    text = err.getvalue()
    assert "loss=1.25" in text and "tokens_per_sec=4096" in text and "/10" in text


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="wandb package is not installed"):
        MetricsLogger(tmp_path, LoggingConfig(report_to=["jsonl", "wandb"], progress_bar=False))


def test_plot_metrics_handles_missing_keys(tmp_path):
    lines = [{"step": s, "loss": 5 / s, "main_loss": 4 / s, "mtp_loss_1": 1 / s, "learning_rate": 1e-4} for s in (1, 2)]
    lines.append({"step": 3, "loss": 1.0, "grad_norm": 0.5})
    src = tmp_path / "metrics.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = plot_metrics(src, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _png_size(png) == (880, 924)  # three panels: losses, learning rate, grad norm
    # No known key at all still yields a (placeholder) one-panel image rather than an error.
    (tmp_path / "other.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    assert _png_size(plot_metrics(tmp_path / "other.jsonl", tmp_path / "empty.png")) == (880, 308)


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])
