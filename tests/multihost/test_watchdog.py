"""A lost process ends a multi-process job on every host within the heartbeat timeout, with one sentence each:
the guard's stream handling on its own, then three local processes (jax.distributed, gloo) with one SIGKILLed,
the coordinator or not, and a process that fails by itself."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from openr1_jax.errors import UserError
from openr1_jax.sharding import watchdog
from tests.multihost.launch import Processes

HEARTBEAT = 5  # seconds; the default (30) would make each test wait that long
SENTENCE = "openr1-jax: error: process {} of {}{} stopped responding (killed or lost); the job stops here - rerun the "
RUNTIME_DUMP = (
    b"E1125 17:32:12.841013   19706 coordination_service_agent.cc:289] Polled an error from coordination service.\n"
    b"F1125 17:32:12.841361   19706 client.h:80] Terminating process because the JAX distributed service detected "
    b"fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n"
    b"2\nThe tasks have crashed.\n*** Check failure stack trace: ***\n    @     0x7f48dba40634  absl::LogMessage\n"
)


def _through_guard(chunks: list[tuple[float, bytes]], checkpoints: Path, count: int) -> bytes:
    """What the guard writes for `chunks` (pause in seconds before each, bytes) arriving on its input."""
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()

    def feed():
        for pause, data in chunks:
            time.sleep(pause)
            os.write(source_w, data)
        os.close(source_w)

    feeder = threading.Thread(target=feed)
    feeder.start()
    watchdog.guard(source_r, sink_w, checkpoints, count)
    feeder.join()
    os.close(sink_w)
    os.close(source_r)
    with os.fdopen(sink_r, "rb") as out:
        return out.read()


def test_guard_passes_output_on_and_replaces_the_runtime_dump_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "DELAY_SECONDS", 0.2)
    (tmp_path / "3").mkdir()
    (tmp_path / "6.orbax-checkpoint-tmp").mkdir()  # an unfinished save is not a checkpoint
    chunks = [(0, b"step 1\nstep"), (0.5, b" 2\n"), (0, b"10%|#  |\r"), (0.5, b"Traceback (most recent call last):\n")]
    out = _through_guard([*chunks, (0, RUNTIME_DUMP)], tmp_path, 4)
    # Whole lines and a progress bar left waiting pass on; the traceback printed just before the dump does not.
    assert out == (
        b"step 1\nstep 2\n10%|#  |\r"
        + SENTENCE.format(2, 4, "").encode()
        + b"same command on every host to resume from the last checkpoint (step 3)\n"
    )


def test_guard_passes_everything_on_when_the_runtime_stays_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(watchdog, "DELAY_SECONDS", 0.05)
    text = b"".join(b"line %d\n" % i for i in range(2000)) + b"no newline at the end"
    assert _through_guard([(0, text[:5000]), (0.1, text[5000:])], tmp_path, 2) == text


@pytest.mark.parametrize(
    "dump,lost",
    [
        ("tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.", [1]),
        ("tasks are unhealthy (stopped sending heartbeats):\n1, 3\n2\nThe tasks have crashed.", [1, 2, 3]),
        ("Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout.", [3]),
        ('while calling /xla.coordination.CoordinationService/PollForError:\n{grpc_message:"Socket closed"}', [0]),
        ("Failed to send RPC to coordination service. Either the leader task was preempted", [0]),
        ("something else entirely", []),
    ],
)
def test_lost_processes_are_read_from_the_runtime_message(dump, lost):
    assert watchdog.lost_processes(dump, 4) == lost


def test_sentence_without_a_checkpoint_or_a_named_process(tmp_path):
    assert watchdog.sentence("?", tmp_path / "missing", 2) == (
        "openr1-jax: error: another process of the job failed; the job stops here - rerun the same command on "
        "every host to resume (no checkpoint was saved yet)"
    )


def test_heartbeat_timeout_comes_from_the_environment():
    assert watchdog.heartbeat_timeout({}) == watchdog.DEFAULT_HEARTBEAT_TIMEOUT
    assert watchdog.heartbeat_timeout({watchdog.HEARTBEAT_ENV: "7"}) == 7
    with pytest.raises(UserError, match="OPENR1_JAX_HEARTBEAT_TIMEOUT='0' must be a whole number"):
        watchdog.heartbeat_timeout({watchdog.HEARTBEAT_ENV: "0"})


def _start(tmp_path: Path, n: int, **kwargs) -> Processes:
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    return Processes(
        "tests.multihost.collective_worker",
        [str(tmp_path / "checkpoints")],
        n=n,
        log_dir=tmp_path / "logs",
        OPENR1_JAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
        **kwargs,
    )


def _assert_one_sentence(output: str, lost: int, count: int) -> None:
    """The output ends with the sentence, and neither a traceback nor the runtime's dump came before it."""
    coordinator = " (the coordinator)" if lost == 0 else ""
    last = output.strip().splitlines()[-1]
    assert last == SENTENCE.format(lost, count, coordinator) + (
        "same command on every host to resume from the last checkpoint (step 4)"
    ), output
    for noise in ("Traceback", "Check failure", "Terminating process", "coordination_service"):
        assert noise not in output, output


@pytest.mark.parametrize("victim", [0, 2], ids=["coordinator", "worker"])
def test_a_killed_process_ends_the_job_with_one_sentence_per_host(tmp_path, victim):
    """Three processes all-reducing in a loop; one is SIGKILLed: the others exit non-zero within the heartbeat
    timeout (at once when the coordinator, which holds JAX's coordination service, is the one lost)."""
    with _start(tmp_path, 3) as job:
        job.wait_for("READY", 120)
        killed_at = job.kill(victim)
        codes = job.wait(HEARTBEAT + 30)
        survivors = [i for i in range(3) if i != victim]
        for i in survivors:
            assert codes[i] != 0, job.tail()
            _assert_one_sentence(job.output(i), victim, 3)
            assert job.ended[i] - killed_at < HEARTBEAT + 10, (job.ended[i] - killed_at, job.tail())
        assert "stopped responding" not in job.output(victim)


def test_a_process_that_fails_by_itself_shows_its_traceback_and_ends_the_job(tmp_path):
    """Its own error (no peer was lost) is held for the heartbeat timeout, then printed; the process exits 1 at
    once instead of waiting at JAX's shutdown barrier, and its peer reports it lost."""
    with _start(tmp_path, 2, only={1: ["--fail"]}) as job:
        job.wait_for("READY", 120)
        codes = job.wait(2 * HEARTBEAT + 40)
        assert codes[1] == 1, job.tail()
        assert "RuntimeError: an error of this process's own" in job.output(1)
        assert codes[0] != 0, job.tail()
        _assert_one_sentence(job.output(0), 1, 2)
