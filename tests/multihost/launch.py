"""Local multi-process jobs for the tests: N processes of one `jax.distributed` job on 127.0.0.1 (gloo CPU
collectives), each with its own simulated CPU devices and log file, all killed when the `with` block ends.

    with Processes("tests.rl.grpo_child", [...overrides], n=2, log_dir=tmp_path / "logs") as job:
        assert job.wait(600) == [0, 0], job.tail()

The children use the session's persistent compile cache. jax 0.10.2 writes it from process 0 of a job only, and
the other processes' cache keys differ, so processes 1.. of a job compile everything: keep the programs small.
`crash_after_save` is for the children's side: a crash at a known step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
COMPILE_CACHE = os.path.expanduser("~/.cache/openr1_jax_test_jit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, **extra: str) -> dict[str, str]:
    """This environment for a child: CPU only, `devices` simulated devices, the test compile cache."""
    joins = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")  # a child joins no job by accident
    env = {k: v for k, v in os.environ.items() if k not in joins}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


class Processes:
    """`python -m MODULE [--process-id I --num-processes N --port P] ARGS [ONLY[I]]` for I in 0..N-1 (n == 1:
    one plain process); stdout and stderr of process I go to `log_dir/process-I.log`."""

    def __init__(
        self,
        module: str,
        args: list[str],
        *,
        n: int,
        log_dir: Path,
        devices: int = 1,
        only: dict[int, list[str]] | None = None,
        **env: str,
    ):
        log_dir.mkdir(parents=True, exist_ok=True)
        port = str(free_port())
        self.logs = [log_dir / f"process-{i}.log" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self.ended: list[float | None] = [None] * n  # time.monotonic() when each process was seen to end
        for i, log in enumerate(self.logs):
            joins = ["--process-id", str(i), "--num-processes", str(n), "--port", port] if n > 1 else []
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *joins, *args, *(only or {}).get(i, [])],
                        cwd=ROOT,
                        env=child_env(devices, **env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: `close` ends its helpers too
                    )
                )

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def poll(self) -> list[int | None]:
        codes = [p.poll() for p in self.procs]
        now = time.monotonic()
        self.ended = [e if e is not None or c is None else now for e, c in zip(self.ended, codes)]
        return codes

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; fails the test (after killing them all) past `timeout` seconds."""
        end = time.monotonic() + timeout
        while None in self.poll():
            if time.monotonic() > end:
                self.close()
                raise AssertionError(f"processes still running after {timeout} s:\n{self.tail()}")
            time.sleep(0.1)
        # A process's stderr guard may write its last words just after the process is gone.
        settle = time.monotonic() + 10
        while self._helpers_running() and time.monotonic() < settle:
            time.sleep(0.1)
        return [p.returncode for p in self.procs]

    def _helpers_running(self) -> bool:
        groups = {p.pid for p in self.procs}
        for proc in psutil.process_iter(["status"]):
            try:
                if os.getpgid(proc.pid) in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (OSError, psutil.Error):
                continue
        return False

    def wait_for(self, text: str, timeout: float) -> None:
        """Until every process has printed `text` (fails the test past `timeout` seconds or if one ends first)."""
        end = time.monotonic() + timeout
        while not all(text in self.output(i) for i in range(len(self.procs))):
            if time.monotonic() > end or any(c is not None for c in self.poll()):
                self.close()
                raise AssertionError(f"not every process printed {text!r}:\n{self.tail()}")
            time.sleep(0.1)

    def kill(self, i: int) -> float:
        """SIGKILL process `i` alone (not its helpers, as a crash would); returns when, in time.monotonic()."""
        self.procs[i].kill()
        return time.monotonic()

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- process {i} ---\n{self.output(i)[-chars:]}" for i in range(len(self.procs)))

    def close(self) -> None:
        """Kill whatever is still running, helpers included."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def crash_after_save(step: int) -> None:
    """In a child, before its run: SIGKILL this process right after the checkpoint of `step` is committed."""
    from openr1_jax.train import checkpointing

    original = checkpointing.Checkpointer.maybe_save

    def save_then_crash(self, at, *args, **kwargs):
        saved = original(self, at, *args, **kwargs)
        if at == step:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    checkpointing.Checkpointer.maybe_save = save_then_crash


def arrive_late(seconds: float) -> None:
    """In a child, before its run: reach the job's first collective (orbax's, as the Checkpointer is made)
    `seconds` after the other processes, with programs already run, as a host does that compiles what the
    others read from the compile cache."""
    from openr1_jax.train import checkpointing

    original = checkpointing.Checkpointer.__init__

    def late_init(self, *args, **kwargs):
        time.sleep(seconds)
        original(self, *args, **kwargs)

    checkpointing.Checkpointer.__init__ = late_init
