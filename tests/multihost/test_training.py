"""SFT and GRPO as multi-host jobs: local processes (jax.distributed on 127.0.0.1, gloo, one CPU device each)
train like one process on as many devices, write orbax checkpoints from every process, and a job that loses a
process stops on every host with one sentence and resumes bit-exactly when rerun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openr1_jax.models.load import load_model
from openr1_jax.models.params import flat_variables
from tests.multihost.launch import Processes
from tests.train.test_sft import TINY as SFT_TINY

# Seconds before a silent process counts as lost, for the run that loses one (the default, 30, would only slow the
# test). 5 s was too short on a loaded 2-core CI machine: a run that lost no process once ended with both
# declared lost. Runs that lose none keep the default.
HEARTBEAT = 10
QUICK_LOSS = {"OPENR1_JAX_HEARTBEAT_TIMEOUT": str(HEARTBEAT)}
GRPO_TINY = [
    "model.name_or_path=tiny-moe",
    "batch_size=8",  # 2 prompts x 4 completions
    "num_generations=4",
    "max_prompt_length=24",
    "max_completion_length=8",
    "rollout.max_batch_size=8",
    "max_steps=4",
    "beta=0.04",  # the reference model's log-probs are computed too
    "reward_funcs=[digits]",
    "reward_kwargs={}",
    "optimizer.learning_rate=3e-3",
    "checkpoint.save_steps=2",
    "logging.logging_steps=1",
    "logging.progress_bar=false",
    "logging.report_to=[jsonl]",
    "evaluation.dataset=null",
]


def params_of(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_variables(load_model(run / "model")).items()}


def train_records(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def run_job(
    module: str, args: list[str], n: int, log_dir: Path, devices: int = 1, only: dict | None = None, **env: str
) -> None:
    with Processes(module, args, n=n, log_dir=log_dir, devices=devices, only=only, **env) as job:
        assert job.wait(600) == [0] * n, job.tail()


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_sft_on_four_hosts_equals_one_process(tmp_path):
    """Four processes, each loading its own quarter of every batch (grain shards by process), equal one process
    on four devices fed the same global batches; the held-out evaluation runs on every host. Three of them reach
    the first collective 40 s after process 0 (gloo's rendezvous alone would give up after 30 s)."""
    one, four = tmp_path / "one", tmp_path / "four"
    run_job("tests.train.sft_child", [*SFT_TINY, f"output_dir={one}", "--shards", "4"], 1, tmp_path / "one-logs", 4)
    evaluation = ["evaluation.dataset=embedded:test", "evaluation.num_examples=4", "evaluation.max_new_tokens=4"]
    late = {i: ["--late", "40"] for i in (1, 2, 3)}
    args = [*SFT_TINY, f"output_dir={four}", *evaluation]
    run_job("tests.train.sft_child", args, 4, tmp_path / "four-logs", only=late)
    assert_close(params_of(four), params_of(one))
    for step, record in train_records(one).items():
        assert train_records(four)[step]["loss"] == pytest.approx(record["loss"], rel=1e-5)
    assert json.loads((four / "eval.json").read_text())["n"] == 4


@pytest.mark.slow
def test_grpo_on_two_hosts_equals_one_process_and_resumes_exactly_after_a_kill(tmp_path):
    """Every host samples the same prompts, one rollout program spreads its rows over both hosts' devices, and
    each host builds only its own rows of the train batch: the parameters equal one process on two devices.
    Then process 1 is killed right after the step-2 checkpoint: process 0 stops within the heartbeat timeout
    with one sentence and no traceback, and rerunning both resumes from step 2 to the very same parameters."""
    one, two, crashed = tmp_path / "one", tmp_path / "two", tmp_path / "crashed"
    run_job("tests.rl.grpo_child", [*GRPO_TINY, f"output_dir={one}"], 1, tmp_path / "one-logs", devices=2)
    # The uninterrupted two-host run also scores the held-out set (greedy rollouts on both hosts).
    evaluation = ["evaluation.dataset=embedded:test", "evaluation.num_examples=4", "evaluation.max_new_tokens=4"]
    run_job("tests.rl.grpo_child", [*GRPO_TINY, f"output_dir={two}", *evaluation], 2, tmp_path / "two-logs")
    assert_close(params_of(two), params_of(one))
    for step, record in train_records(one).items():  # the same samples, rewards and updates
        got = train_records(two)[step]
        assert (got["reward"], got["grad_norm"]) == pytest.approx((record["reward"], record["grad_norm"]), rel=1e-5)
        assert got["grad_norm"] > 0
    assert [e["step"] for e in json.loads((two / "eval.json").read_text())] == [0, 4]

    args = [*GRPO_TINY, f"output_dir={crashed}"]
    logs = tmp_path / "crashed-logs"
    with Processes(
        "tests.rl.grpo_child", args, n=2, log_dir=logs, only={1: ["--kill-after-save", "2"]}, **QUICK_LOSS
    ) as job:
        codes = job.wait(600)
        assert codes[1] == -9 and codes[0] != 0, job.tail()
        assert job.ended[0] - job.ended[1] < HEARTBEAT + 15, job.tail()
        last = job.output(0).strip().splitlines()[-1]
        assert last == (
            "openr1-jax: error: process 1 of 2 stopped responding (killed or lost); the job stops here - rerun the "
            "same command on every host to resume from the last checkpoint (step 2)"
        ), job.tail()
        assert "Traceback" not in job.output(0) and "RESULT" not in job.output(0)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["2"]

    run_job("tests.rl.grpo_child", args, 2, tmp_path / "resumed-logs")
    want, got = params_of(two), params_of(crashed)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert {s: r["loss"] for s, r in train_records(crashed).items()} == {
        s: r["loss"] for s, r in train_records(two).items()
    }
