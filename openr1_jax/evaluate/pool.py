"""Calls in worker processes with a wall-clock limit each: a call that runs past it is killed, not waited for.

math-verify bounds its own time with `signal.alarm`, which only works in a process's main thread and cannot stop
sympy inside C code for sure. Here every call runs in a worker process instead; when one overruns, the parent
kills that worker, records the call as timed out and starts a fresh worker, so one pathological answer costs
`timeout_s`, never the run. Workers are forked from a forkserver (a clean interpreter, never the parent with its
JAX threads) that has already imported the modules in `preload`, so a replacement starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from openr1_jax.errors import UserError


@dataclass(frozen=True)
class CallResult:
    value: Any = None
    timed_out: bool = False
    error: str | None = None  # the exception the call raised (type: message), or why its worker died

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.error is None


def _worker_main(conn) -> None:
    """Run `(task_id, fn, args)` messages until the parent closes the pipe or sends None."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, fn, args = message
        try:
            reply = (task_id, True, fn(*args))
        except Exception as e:  # the call's own failure is a result, not the worker's
            reply = (task_id, False, f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable return value
            conn.send((task_id, False, f"cannot return the result: {type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class BoundedPool:
    """`pool.map(fn, [args, ...])` -> one `CallResult` per call, in order; each call gets at most `timeout_s`.

    `fn` must be picklable (a module-level function). Use as a context manager, or call `close()`.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, preload: Sequence[str] = ()) -> None:
        if num_workers < 1:
            raise UserError(f"the scoring pool needs at least one worker, not {num_workers}")
        if not timeout_s > 0:
            raise UserError(f"the scoring timeout must be positive, not {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._ctx = multiprocessing.get_context("forkserver")
        if preload:
            # Takes effect only if this process's forkserver has not started yet; otherwise it just costs speed.
            self._ctx.set_forkserver_preload(list(preload))
        self._workers: list[_Worker] = []
        self.timeouts = 0  # calls killed over the pool's life

    def __enter__(self) -> BoundedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def start(self) -> BoundedPool:
        """Start the workers now (they otherwise start on the first `map`), e.g. while a model loads."""
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))
        return self

    def map(self, fn: Callable, args_list: Sequence[tuple]) -> list[CallResult]:
        results: list[CallResult | None] = [None] * len(args_list)
        if not args_list:
            return []
        while len(self._workers) < min(self.num_workers, len(args_list)):
            self._workers.append(_Worker(self._ctx))
        pending = deque(enumerate(args_list))
        idle = list(self._workers)
        busy: dict[Any, tuple[_Worker, int, float]] = {}  # conn -> (worker, task index, deadline)
        while pending or busy:
            while idle and pending:
                worker = idle.pop()
                index, args = pending.popleft()
                try:
                    worker.conn.send((index, fn, tuple(args)))
                except OSError:  # the worker died while idle: hand the call to a fresh one
                    worker = self._replace(worker)
                    worker.conn.send((index, fn, tuple(args)))
                busy[worker.conn] = (worker, index, time.monotonic() + self.timeout_s)
            wait_s = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
            for conn in multiprocessing.connection.wait(list(busy), timeout=wait_s):
                worker, index, _ = busy.pop(conn)
                try:
                    _, ok, value = conn.recv()
                except (EOFError, OSError):  # the worker died (killed for memory, crashed in C code)
                    results[index] = CallResult(error=f"worker exited with code {worker.process.exitcode}")
                    idle.append(self._replace(worker))
                    continue
                results[index] = CallResult(value=value) if ok else CallResult(error=value)
                idle.append(worker)
            now = time.monotonic()
            for conn, (worker, index, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[conn]
                    results[index] = CallResult(timed_out=True)
                    self.timeouts += 1
                    idle.append(self._replace(worker))
        return results  # type: ignore[return-value]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._ctx)
        self._workers[self._workers.index(worker)] = fresh
        return fresh
