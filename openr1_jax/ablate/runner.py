"""`openr1-jax ablate`: every (arm, seed) of a sweep as its own recipe run, resumable, then the results table.

Each run is `python -m openr1_jax.cli <recipe> <base> <overrides> seed=K output_dir=OUT/runs/<arm>/seed<K>` in a
child process: a crashed arm does not take the sweep down, its memory goes back to the OS, and an interrupted
run resumes from its own checkpoints. `ablate.json` in the run's folder records what it was started with and
whether it finished; a rerun of the sweep skips finished runs and refuses a folder made with other settings.

Runs go seed-major (every arm's seed 0, then seed 1, ...), so a sweep stopped halfway already compares all arms.
On several hosts (`host_count`), host i runs every host_count-th run; they share the output folder, and every
host rebuilds the table from whatever has finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from openr1_jax.ablate.config import SweepConfig, arm_args
from openr1_jax.errors import UserError
from openr1_jax.fileio import atomic_file
from openr1_jax.structured import parse_overrides

MARKER = "ablate.json"
LOG = "ablate.log"
# Loaded here, not in the forked child: after a fork only async-signal-safe work (a plain syscall) is safe.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    args: tuple[str, ...]  # recipe overrides, seed and output_dir excluded
    out: Path

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"


@dataclass
class AblationResult:
    runs: list[Run]
    finished: list[Run]  # every finished run of the sweep, any host's
    failed: list[Run] = field(default_factory=list)  # this call's runs that exited with an error
    stopped: bool = False  # a SIGTERM stopped the sweep; rerunning resumes it
    results_dir: Path | None = None


def plan_runs(cfg: SweepConfig) -> list[Run]:
    arms = cfg.expand_arms()
    return [
        Run(arm.name, seed, tuple(arm_args(cfg, arm)), cfg.runs_root / "runs" / arm.name / f"seed{seed}")
        for seed in cfg.seeds
        for arm in arms
    ]


def read_marker(run: Run) -> dict | None:
    path = run.out / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(run: Run) -> bool:
    marker = read_marker(run)
    return marker is not None and marker.get("status") == "finished"


def _check_unchanged(cfg: SweepConfig, runs: list[Run]) -> None:
    """A run folder started with other settings would mix two experiments in one row: refuse it."""
    for run in runs:
        marker = read_marker(run)
        if marker is None:
            continue
        then = {"recipe": marker.get("recipe"), "base": marker.get("base"), **_settings(marker.get("overrides", ()))}
        now = {"recipe": cfg.recipe, "base": cfg.base, **_settings(run.args)}
        changed = [k for k in {**then, **now} if then.get(k, "unset") != now.get(k, "unset")]
        if changed:
            key = changed[0]
            raise UserError(
                f"run folder {run.out} was started with {key} = {then.get(key, 'unset')!r}, but the sweep now says "
                f"{now.get(key, 'unset')!r}: restore the sweep file, rename the arm, or remove that folder"
            )


def _settings(args) -> dict[str, object]:
    """`key=value` words -> {dotted key: parsed value}, the last word winning, as the recipe reads them."""
    return {".".join(keys): _number(value) for keys, value in parse_overrides(list(args))}


def _number(value: object) -> object:
    """YAML 1.1 reads `2e-4` as a string and `2.0e-4` as a float; the configs take both as the same number."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _write_marker(cfg: SweepConfig, run: Run, **status) -> None:
    record = {"recipe": cfg.recipe, "base": cfg.base, "arm": run.arm, "seed": run.seed, "overrides": list(run.args)}
    with atomic_file(run.out / MARKER) as tmp:
        tmp.write_text(json.dumps({**record, **status}, indent=2) + "\n")


def _core_sets(jobs: int) -> list[set[int] | None]:
    """Disjoint CPU sets for `jobs` concurrent runs: XLA:CPU sizes its thread pool by the process's affinity, so
    pinned runs do not oversubscribe the machine. None (no pinning) where affinity is unavailable or short."""
    if jobs == 1 or not hasattr(os, "sched_getaffinity"):
        return [None] * jobs
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < jobs:
        return [None] * jobs
    return [set(cores[i * len(cores) // jobs : (i + 1) * len(cores) // jobs]) for i in range(jobs)]


def _child_setup(cores: set[int] | None):
    def setup() -> None:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        if _LIBC is not None:
            # If the sweep is killed outright, its run gets SIGTERM (saves and exits) instead of living on and
            # racing the next attempt for the same folder.
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


@dataclass
class _Child:
    run: Run
    proc: subprocess.Popen
    slot: int
    started: float
    log: object
    earlier_seconds: float  # spent by earlier attempts of this run


class _Stop:
    """SIGINT/SIGTERM while runs are going: pass SIGTERM on (the recipes save and exit between steps), start
    nothing new; a second signal kills the runs."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.children: list[_Child] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        again = self.signal is not None
        self.signal = signum
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGKILL if again else signal.SIGTERM)


def _execute(cfg: SweepConfig, todo: list[Run], jobs: int, on_finish) -> tuple[list[Run], bool]:
    """Run `todo`, `jobs` at a time; returns (failed runs, stopped by a signal)."""
    from tqdm.auto import tqdm

    slots = _core_sets(jobs)
    free = list(range(jobs))
    queue = list(todo)
    failed: list[Run] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bar = tqdm(total=len(todo), desc=f"ablate {cfg.name}", unit="run", dynamic_ncols=True, disable=None)
    with _Stop() as stop:
        while queue or stop.children:
            while queue and free and stop.signal is None:
                run, slot = queue.pop(0), free.pop(0)
                run.out.mkdir(parents=True, exist_ok=True)
                earlier = (read_marker(run) or {}).get("seconds", 0.0)
                _write_marker(cfg, run, status="running", seconds=earlier)
                cmd = [sys.executable, "-m", "openr1_jax.cli", cfg.recipe, cfg.base, *run.args]
                cmd += [f"seed={run.seed}", f"output_dir={run.out}"]
                log = open(run.out / LOG, "a")  # noqa: SIM115 (closed when the run ends)
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_setup(slots[slot])
                )
                stop.children.append(_Child(run, proc, slot, time.time(), log, earlier))
                bar.set_postfix_str(run.name)
            time.sleep(0.2)
            for child in [c for c in stop.children if c.proc.poll() is not None]:
                stop.children.remove(child)
                free.append(child.slot)
                child.log.close()
                seconds = time.time() - child.started
                total = round(child.earlier_seconds + seconds, 1)  # the run's compute time over all attempts
                code = child.proc.returncode
                # Exit 0 without the exported model is a preempted run (it saved a checkpoint and stopped).
                if code == 0 and (child.run.out / "model").is_dir():
                    _write_marker(cfg, child.run, status="finished", seconds=total)
                    bar.update(1)
                    bar.write(f"{child.run.name}: finished in {seconds:.0f} s")
                    on_finish()
                elif code == 0 or stop.signal is not None:
                    _write_marker(cfg, child.run, status="stopped", seconds=total)
                    bar.write(f"{child.run.name}: stopped after {seconds:.0f} s; it resumes on the next call")
                else:
                    _write_marker(cfg, child.run, status="failed", exit_code=code, seconds=total)
                    failed.append(child.run)
                    bar.write(f"{child.run.name}: failed (exit {code}); see {child.run.out / LOG}")
    bar.close()
    if stop.signal == signal.SIGINT:
        raise KeyboardInterrupt
    return failed, stop.signal is not None


def run_ablation(
    cfg: SweepConfig, jobs: int = 1, host_index: int = 0, host_count: int = 1, table_only: bool = False
) -> AblationResult:
    """Run this host's unfinished runs of the sweep (none with `table_only`), then write the results table and
    plots from every finished run."""
    from openr1_jax.ablate.results import write_results

    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, not {jobs}")
    if host_count < 1 or not 0 <= host_index < host_count:
        raise UserError(f"--host-index must be in [0, --host-count), not {host_index} of {host_count}")
    runs = plan_runs(cfg)
    _check_unchanged(cfg, runs)

    def tables() -> None:  # after every finished run, so a long sweep shows its results as they come
        try:
            write_results(cfg, [r for r in runs if is_finished(r)])
        except UserError as err:  # e.g. a metric key no run logs: say so, keep the other runs going
            print(f"results not written: {err}", file=sys.stderr, flush=True)

    failed, stopped = [], False
    if not table_only:
        mine = runs[host_index::host_count]
        todo = [r for r in mine if not is_finished(r)]
        if len(todo) < len(mine):
            print(f"{len(mine) - len(todo)} of {len(mine)} runs already finished", flush=True)
        failed, stopped = _execute(cfg, todo, jobs, tables)
    finished = [r for r in runs if is_finished(r)]
    if finished:
        write_results(cfg, finished)
    return AblationResult(runs, finished, failed, stopped, cfg.results_root if finished else None)
