"""The SFT job end to end: outputs, exact resume after kill -9, preemption, two hosts == one, the recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openr1_jax.models.load import load_model
from openr1_jax.models.params import flat_variables
from openr1_jax.train.config import load_sft_config
from openr1_jax.train.sft import run_sft
from tests.multihost.launch import ROOT, child_env, free_port

TINY = [
    "model.name_or_path=tiny-moe",
    "model.dtype=float32",
    "batch_size=4",
    "max_steps=6",
    "data.seq_len=64",
    "optimizer.learning_rate=3e-3",
    "optimizer.warmup_steps=2",
    "checkpoint.save_steps=3",
    "logging.logging_steps=1",
    "logging.progress_bar=false",
    "evaluation.dataset=null",
]


def start_child(out: Path, *flags: str, devices: int = 2, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.train.sft_child", *flags, *TINY, f"output_dir={out}", *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_child(out: Path, *flags: str, devices: int = 2, extra=(), expect: int = 0) -> str:
    proc = start_child(out, *flags, devices=devices, extra=extra)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, output[-3000:]
    return output


def params_of(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.value) for k, v in flat_variables(load_model(run / "model")).items()}


def losses_of(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_tiny_run_writes_everything_and_learns(tmp_path, monkeypatch):
    """In process, on the session's 8 simulated devices (fsdp=8): checkpoints, metrics, plot, model, HF; the
    output folder given relative to the working directory."""
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_sft_config(
        "default",
        [*TINY, "batch_size=8", "max_steps=12", f"output_dir={tmp_path.name}", "export_hf=true"],
    )
    result = run_sft(cfg)
    assert (result.steps, result.preempted) == (12, False)
    losses = losses_of(tmp_path)
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < 0.8 * losses[1]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "main_loss", "mtp_loss_1", "grad_norm", "learning_rate", "tokens_per_sec"):
        assert np.isfinite(record[key]), key
    assert record["expert_load_max_over_mean"] > 0 and record["expert_load_cv"] >= 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "9"]
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "model" / "model_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("model.overrides.scan_layers=true",)], ids=["unrolled", "scanned"])
def test_exact_resume_after_kill_9(tmp_path, extra):
    """Train 6 steps; train 3, kill -9, resume to 6: parameters and the resumed losses are bitwise equal (also
    with scanned layers, whose train checkpoints hold the stacked arrays)."""
    run_child(tmp_path / "full", extra=extra)
    crash = tmp_path / "crash"
    output = run_child(crash, "--kill-after-save", "3", expect=-9, extra=extra)
    assert "RESULT" not in output
    assert sorted(p.name for p in (crash / "checkpoints").iterdir()) == ["3"]
    run_child(crash, extra=extra)
    full, resumed = params_of(tmp_path / "full"), params_of(crash)
    assert full.keys() == resumed.keys()
    for name in full:
        np.testing.assert_array_equal(full[name], resumed[name], err_msg=name)
    assert losses_of(crash) == losses_of(tmp_path / "full")


def _run_pair(out: Path, *flags: str) -> None:
    port = str(free_port())
    procs = [
        start_child(out, "--process-id", str(i), "--num-processes", "2", "--port", port, *flags, devices=1)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_with_preemption_and_restore(tmp_path):
    """Two hosts (jax.distributed + gloo, one CPU device each, per-host data loading) are preempted at step 3,
    restore from the checkpoint and finish: the parameters equal one process running the same global batches."""
    run_child(tmp_path / "one", "--shards", "2")
    two = tmp_path / "two"
    _run_pair(two, "--stop-at", "3")
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["3"]
    assert not (two / "model").exists()
    _run_pair(two)
    one, pair = params_of(tmp_path / "one"), params_of(two)
    for name in one:
        np.testing.assert_allclose(pair[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for step, loss in losses_of(tmp_path / "one").items():
        assert losses_of(two)[step] == pytest.approx(loss, rel=1e-5)
