"""`openr1-jax ablate`: a two-arm, two-seed SFT sweep is killed mid-way and resumed without redoing finished runs,
and its table holds the per-run numbers' means and spreads; sweep files are checked before anything runs."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from openr1_jax.ablate import load_sweep_config, run_ablation
from openr1_jax.ablate import runner as ablate_runner
from openr1_jax.ablate.config import SWEEP_DIR, MetricSection
from openr1_jax.ablate.results import series
from openr1_jax.cli import main
from openr1_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

TINY_SWEEP = """
recipe: sft
base: default
overrides:
  model.name_or_path: tiny-moe
  model.dtype: float32
  batch_size: 4
  max_steps: 4
  data.seq_len: 32
  checkpoint: {save_steps: 2}
  logging: {logging_steps: 1, report_to: [jsonl]}
  evaluation.dataset: null
seeds: [0, 1]
arms:
  - {name: mtp}
  - {name: no-mtp, overrides: {training.mtp_loss_weight: 0}}
metrics:
  - {key: main_loss, reduce: final}
  - {key: expert_load_cv, reduce: mean, name: mean load CV}
  - {key: mtp_loss_1, reduce: min}
"""


def write_sweep(tmp_path: Path, text: str = TINY_SWEEP, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + f"output_dir: {tmp_path / 'out'}\n")
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COMPILATION_CACHE_DIR=os.path.expanduser("~/.cache/openr1_jax_test_jit"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def attempts(run_dir: Path) -> int:
    """How many times the sweep started this run (each start appends a header line to its log)."""
    return sum(line.startswith("=== ") for line in (run_dir / ablate_runner.LOG).read_text().splitlines())


def test_sweep_is_killed_resumed_and_tabulated(tmp_path):
    sweep = write_sweep(tmp_path)
    runs = tmp_path / "out" / "runs"
    first, second = runs / "mtp" / "seed0", runs / "no-mtp" / "seed0"  # seed-major order
    cmd = [sys.executable, "-m", "openr1_jax.cli", "ablate", str(sweep)]

    # 1. Kill the sweep (SIGKILL, no chance to clean up) once its first run has finished.
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (first / ablate_runner.MARKER).is_file() or "finished" not in (first / ablate_runner.MARKER).read_text():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the first run did not finish in time"
        time.sleep(0.2)
    while not (children := psutil.Process(proc.pid).children(recursive=True)):  # the second run has started
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=60)  # the run is told to stop when its sweep dies
    assert not alive, [p.cmdline() for p in alive]
    done_at = (first / ablate_runner.MARKER).stat().st_mtime_ns
    model_at = (first / "model").stat().st_mtime_ns
    assert json.loads((second / ablate_runner.MARKER).read_text())["status"] != "finished"

    # 2. The same command again, two runs at a time: the finished run is skipped, the killed one starts again
    # (from its checkpoint if it had saved one), the others run.
    proc = subprocess.run(
        [*cmd, "--jobs", "2"], env=child_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "1 of 4 runs already finished" in proc.stdout
    assert "4 of 4 runs finished" in proc.stdout
    assert (first / ablate_runner.MARKER).stat().st_mtime_ns == done_at
    assert (first / "model").stat().st_mtime_ns == model_at
    assert attempts(first) == 1 and attempts(second) == 2 and attempts(runs / "no-mtp" / "seed1") == 1

    # 3. The tables: per-run numbers straight from each run's metrics.jsonl, then mean and spread per arm.
    def logged(arm: str, seed: int, key: str) -> list[float]:
        rows = [json.loads(line) for line in (runs / arm / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if key in r]

    expected = {
        (arm, seed): {
            "final main_loss": logged(arm, seed, "main_loss")[-1],
            "mean load CV": sum(cv := logged(arm, seed, "expert_load_cv")) / len(cv),
            "min mtp_loss_1": min(logged(arm, seed, "mtp_loss_1"), default=None),
        }
        for arm in ("mtp", "no-mtp")
        for seed in (0, 1)
    }
    assert len(logged("mtp", 0, "main_loss")) == 4 and expected["no-mtp", 0]["min mtp_loss_1"] is None
    out = tmp_path / "out"
    with (out / "runs.csv").open() as f:
        per_run = list(csv.DictReader(f))
    assert [(r["arm"], r["seed"]) for r in per_run] == [("mtp", "0"), ("mtp", "1"), ("no-mtp", "0"), ("no-mtp", "1")]
    for r in per_run:
        for label, value in expected[r["arm"], int(r["seed"])].items():
            assert (float(r[label]) if r[label] else None) == value

    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["arm"] for r in table] == ["mtp", "no-mtp"] and all(r["seeds"] == "2" for r in table)
    for r in table:
        for label in ("final main_loss", "mean load CV"):
            a, b = expected[r["arm"], 0][label], expected[r["arm"], 1][label]
            assert float(r[f"{label} mean"]) == pytest.approx((a + b) / 2, rel=1e-12)
            assert float(r[f"{label} std"]) == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9)  # n-1
            assert (float(r[f"{label} min"]), float(r[f"{label} max"])) == (min(a, b), max(a, b))
    no_mtp = table[1]
    assert (no_mtp["min mtp_loss_1 n"], no_mtp["min mtp_loss_1 mean"]) == ("0", "")  # that arm has no MTP loss

    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| mtp |") or line.startswith("| no-mtp |")]
    assert len(rows) == 4  # the results row and the overrides row of each arm
    assert "| mtp | 2/2 | " in md and "| no-mtp | 2/2 | " in md and "±" in md
    assert "`training.mtp_loss_weight=0`" in md
    for png in ("final.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 4. --table-only rebuilds the same table from the finished runs, running nothing.
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    result = run_ablation(load_sweep_config(str(sweep)), table_only=True)
    assert len(result.finished) == 4 and (out / "results.csv").read_text() == before
    assert attempts(first) == 1


def test_hosts_split_the_runs(tmp_path, monkeypatch):
    """Host i of N takes every N-th run (seed-major), skipping finished ones; the runs themselves are stubbed."""
    cfg = load_sweep_config(str(write_sweep(tmp_path)))
    taken = []

    def execute(cfg, todo, jobs, on_finish):
        taken.append([r.name for r in todo])
        return [], False

    monkeypatch.setattr(ablate_runner, "_execute", execute)
    for host in (0, 1):
        run_ablation(cfg, host_index=host, host_count=2)
    assert taken == [["mtp/seed0", "mtp/seed1"], ["no-mtp/seed0", "no-mtp/seed1"]]
    with pytest.raises(UserError, match="--host-index"):
        run_ablation(cfg, host_index=2, host_count=2)


def test_eval_series_reads_sft_and_grpo_eval_files(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps({"accuracy": 0.5, "n": 2, "samples": []}))  # SFT: one evaluation
    assert series(tmp_path, MetricSection("accuracy", source="eval")) == [0.5]
    evals = [{"step": 0, "accuracy": 0.1}, {"step": 5, "accuracy": 0.3}, {"step": 10, "accuracy": 0.2}]
    (tmp_path / "eval.json").write_text(json.dumps(evals))  # GRPO: one per evaluation step
    assert series(tmp_path, MetricSection("accuracy", source="eval")) == [0.1, 0.3, 0.2]


def test_grid_arms_and_shipped_sweeps(tmp_path):
    text = (
        TINY_SWEEP.split("arms:")[0]
        + "grid:\n  training.mtp_loss_weight: [0, 0.3]\n  optimizer.learning_rate: [1e-3]\n"
    )
    text += "metrics: [{key: loss}]\n"
    cfg = load_sweep_config(str(write_sweep(tmp_path, text)))
    arms = cfg.expand_arms()
    assert [a.name for a in arms] == ["mtp_loss_weight=0,learning_rate=1e-3", "mtp_loss_weight=0.3,learning_rate=1e-3"]
    runs = ablate_runner.plan_runs(cfg)
    assert len(runs) == 4 and "training.checkpoint" not in " ".join(runs[0].args)
    assert "checkpoint.save_steps=2" in runs[0].args and "training.mtp_loss_weight=0.3" in runs[1].args
    shipped = {p.stem: len(load_sweep_config(str(p)).expand_arms()) for p in SWEEP_DIR.glob("*.yaml")}
    assert shipped["moe-balancing"] == 4 and shipped["grpo-loss"] == 6


BAD = [
    ("recipe: sft\narms: [{name: a}]\nmetrics: [{key: loss}]\nsede: [1]\n", ["'sede'", "'seeds'"]),
    ("recipe: ppo\narms: [{name: a}]\nmetrics: [{key: loss}]\n", ["'recipe'", "'ppo'"]),
    ("recipe: sft\nmetrics: [{key: loss}]\n", ["no arms"]),
    ("recipe: sft\narms: [{name: a}, {name: a}]\nmetrics: [{key: loss}]\n", ["'a'", "twice"]),
    ("recipe: sft\narms: [{name: a/b}]\nmetrics: [{key: loss}]\n", ["'a/b'"]),
    ("recipe: sft\narms: [{name: a}]\nmetrics: [{key: loss, reduce: best}]\n", ["'metrics.0.reduce'", "'best'"]),
    ("recipe: sft\narms: [{name: a}]\nmetrics: []\n", ["'metrics'"]),
    ("recipe: sft\narms: [{name: a, overrides: {seed: 3}}]\nmetrics: [{key: loss}]\n", ["'seed'"]),
    ("recipe: sft\ngrid: {beta: []}\nmetrics: [{key: loss}]\n", ["'grid.beta'"]),
    (
        "recipe: sft\narms: [{name: a, overrides: {training.mtp_wieght: 0}}]\nmetrics: [{key: loss}]\n",
        ["arm 'a'", "mtp_wieght"],
    ),
    (
        "recipe: grpo\narms: [{name: a, overrides: {loss_type: ppo}}]\nmetrics: [{key: loss}]\n",
        ["arm 'a'", "loss_type"],
    ),
]


@pytest.mark.parametrize("text, fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_sweep_files_fail_in_one_sentence_naming_key_and_file(tmp_path, capsys, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["ablate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    for fragment in [str(path), *fragments]:
        assert fragment in err, err
    assert not (ROOT / "runs" / "ablate" / "bad").exists()
