"""A multi-host job whose process dies stops everywhere within a bounded time, with one sentence per host.

What JAX does when a process of a `jax.distributed` job dies (jax 0.10.2, measured with local processes):
- Its runtime sends heartbeats from a C++ thread. The coordination service (inside process 0) declares a process
  dead after `heartbeat_timeout` seconds without one; every other process then aborts itself (LOG(FATAL), SIGABRT,
  exit status 134) after printing a page of C++ log and a stack trace. When process 0 itself dies the others
  abort at once: their error-polling RPC to it fails.
- A collective with a dead peer either raises in the calling thread (gloo: "Connection reset by peer") or blocks;
  the abort above comes within the heartbeat timeout either way, so nothing hangs.
- The runtime's hook to replace the abort (`missed_heartbeat_callback`) fails inside jaxlib's bindings
  (std::bad_cast), so a process cannot intercept its own end: another process has to speak for it.

So `peer_watch` (around a training run on every process of a multi-process job):
- passes this process's stderr (file descriptor 2: Python and C++ alike) through a small guard process
  (`python watchdog.py`, this file as a script, standard library only) that forwards it one second late. When
  the runtime's fatal message arrives, the guard drops what is pending (the runtime's log, a traceback that a
  background thread printed in the same instant) and everything after, and prints one sentence: which process
  stopped responding and the checkpoint to resume from.
- holds an exception raised inside the block (a collective that failed because a peer died) for the heartbeat
  timeout plus a margin, so the runtime's verdict comes first. An error that is not followed by that verdict is
  this process's own: its traceback is printed and the process exits at once (status 1) rather than waiting at
  JAX's shutdown barrier for peers that wait for it; they then see it as a lost process. A UserError (bad
  input, the same on every host) passes straight through.

The heartbeat timeout is OPENR1_JAX_HEARTBEAT_TIMEOUT seconds (default 30; JAX's own default is 100), passed to
`jax.distributed.initialize` by `openr1_jax.sharding.distributed`.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

HEARTBEAT_ENV = "OPENR1_JAX_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT = 30
DELAY_SECONDS = 1.0  # how late the guard forwards stderr: the runtime's dump comes within microseconds of its verdict
FATAL_MARKER = b"Terminating process because the JAX distributed service detected fatal errors"


def heartbeat_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds without a heartbeat after which a process counts as lost (OPENR1_JAX_HEARTBEAT_TIMEOUT)."""
    from openr1_jax.errors import UserError

    value = (os.environ if env is None else env).get(HEARTBEAT_ENV, "")
    if value == "":
        return DEFAULT_HEARTBEAT_TIMEOUT
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"environment variable {HEARTBEAT_ENV}={value!r} must be a whole number of seconds >= 1")
    return int(value)


@contextlib.contextmanager
def peer_watch(checkpoints: Path) -> Iterator[None]:
    """Guard a multi-process run (see the module docstring); nothing happens in a single-process run.
    `checkpoints`: the run's checkpoint folder, named in the sentence as the place a rerun resumes from."""
    import jax

    if jax.process_count() == 1:
        yield
        return
    guard = _start_guard(checkpoints, jax.process_count())
    try:
        yield
    except Exception as err:
        from openr1_jax.errors import UserError

        if isinstance(err, UserError):
            raise
        # Most likely a collective that failed because a peer died: the runtime aborts this process (and the
        # guard says why) within the heartbeat timeout. Still here after it: the error is this process's own.
        time.sleep(heartbeat_timeout() + 5)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        _stop_guard(guard)


def _start_guard(checkpoints: Path, count: int) -> tuple[subprocess.Popen, int]:
    sys.stderr.flush()
    guard = subprocess.Popen(
        [sys.executable, "-I", __file__, str(checkpoints), str(count)],
        stdin=subprocess.PIPE,
        stdout=sys.__stderr__.fileno(),
    )
    saved = os.dup(2)
    os.dup2(guard.stdin.fileno(), 2)
    guard.stdin.close()  # fd 2 is now the pipe's only write end in this process
    return guard, saved


def _stop_guard(started: tuple[subprocess.Popen, int]) -> None:
    guard, saved = started
    sys.stderr.flush()
    os.dup2(saved, 2)  # the pipe loses its writer: the guard forwards what is left and exits
    os.close(saved)
    # What it still holds is out within DELAY_SECONDS; it may outlive this block if a helper process started
    # inside it (a reward worker pool) still holds the pipe, and it then goes on forwarding that helper's output.
    with contextlib.suppress(subprocess.TimeoutExpired):
        guard.wait(timeout=DELAY_SECONDS + 0.5)


# ----------------------------------------------------------------------------------------------------------
# The guard process (standard library only: it starts in a fraction of a second).
# ----------------------------------------------------------------------------------------------------------
def lost_processes(dump: str, count: int) -> list[int]:
    """The processes the runtime's fatal message names as dead (the ids listed after 'stopped sending
    heartbeats:', or 'Task N heartbeat timeout'), or [0] when what failed is the connection to the coordinator."""
    ids = re.findall(r"[Tt]ask (\d+) heartbeat timeout", dump)
    listed = re.search(r"stopped sending heartbeats\):\s*\n((?:[\d,\s]*\d[\d,\s]*\n)+)", dump)
    if listed:
        ids += re.findall(r"\d+", listed.group(1))
    if ids:
        return sorted({int(i) for i in ids if int(i) < count})
    if re.search(r"coordination service|leader task|Socket closed", dump):
        return [0]
    return []


def latest_checkpoint(checkpoints: Path) -> int | None:
    """The newest finished checkpoint step: orbax writes `<step>.orbax-checkpoint-tmp` and renames it to
    `<step>` once complete, so a folder named by digits alone is a whole checkpoint."""
    try:
        steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError:
        return None
    return max(steps, default=None)


def sentence(dump: str, checkpoints: Path, count: int) -> str:
    lost = lost_processes(dump, count)
    if not lost:
        who = "another process of the job failed"
    else:
        names = ", ".join(str(i) for i in lost)
        coordinator = " (the coordinator)" if lost == [0] else ""
        plural = "es" if len(lost) > 1 else ""
        who = f"process{plural} {names} of {count}{coordinator} stopped responding (killed or lost)"
    step = latest_checkpoint(checkpoints)
    resume = f"from the last checkpoint (step {step})" if step is not None else "(no checkpoint was saved yet)"
    return f"openr1-jax: error: {who}; the job stops here - rerun the same command on every host to resume {resume}"


def guard(source: int, sink: int, checkpoints: Path, count: int) -> None:
    """Copy `source` to `sink` DELAY_SECONDS late, a line at a time (an unfinished line, e.g. a progress bar,
    once it has waited that long); at the runtime's fatal message drop what is pending and print the sentence."""
    pending: deque[tuple[float, bytes]] = deque()  # (arrival time, whole line)
    unfinished, since = b"", 0.0
    while True:
        now = time.monotonic()
        while pending and now - pending[0][0] >= DELAY_SECONDS:
            os.write(sink, pending.popleft()[1])
        if unfinished and not pending and now - since >= DELAY_SECONDS:
            os.write(sink, unfinished)
            unfinished = b""
        waiting = ([pending[0][0]] if pending else []) + ([since] if unfinished else [])
        timeout = max(0.0, min(waiting) + DELAY_SECONDS - now) if waiting else None
        if not select.select([source], [], [], timeout)[0]:
            continue
        chunk = os.read(source, 1 << 16)
        if not chunk:
            break
        continued = bool(unfinished)
        *lines, unfinished = (unfinished + chunk).split(b"\n")
        if unfinished and (lines or not continued):
            since = time.monotonic()
        pending.extend((time.monotonic(), line + b"\n") for line in lines)
        if any(FATAL_MARKER in line for line in lines) or FATAL_MARKER in unfinished:
            # The rest of the message (the lost process ids) follows within microseconds.
            dump = b"".join(line for _, line in pending) + unfinished + _read_for(source, 1.0)
            os.write(sink, (sentence(dump.decode(errors="replace"), checkpoints, count) + "\n").encode())
            _read_for(source, None)  # swallow the rest of the dump until the process is gone
            return
    for _, line in pending:
        os.write(sink, line)
    os.write(sink, unfinished)


def _read_for(source: int, seconds: float | None) -> bytes:
    """Everything `source` gives within `seconds` (None: until end of file)."""
    out, end = b"", None if seconds is None else time.monotonic() + seconds
    while end is None or time.monotonic() < end:
        timeout = None if end is None else max(0.0, end - time.monotonic())
        if not select.select([source], [], [], timeout)[0]:
            break
        chunk = os.read(source, 1 << 16)
        if not chunk:
            break
        out += chunk
    return out


if __name__ == "__main__":
    # Ctrl-C and SIGTERM are for the training process; the guard lives until its stderr closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    guard(0, 1, Path(sys.argv[1]), int(sys.argv[2]))
