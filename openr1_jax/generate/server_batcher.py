"""Continuous request batching for the server: many HTTP threads in, one engine thread out.

Handler threads `submit` a validated request and read its events; the single worker thread takes every request
waiting (up to the engine's batch size, lingering `wait_s` for more to arrive), runs them in ONE
`engine.generate` call with per-prompt SamplingParams, and routes stream deltas and results back to each
request's event queue. JAX state is touched by that one thread only.

Events on `Job.events`: ("delta", choice, text) while streaming, then exactly one of ("done", outputs) or
("error", status, message).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.generate.server_requests import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class Job:
    request: GenerationRequest
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    delivered: bool = False  # some stream delta already reached the client: no silent retry possible


class Batcher:
    def __init__(self, engine: Any, max_batch_size: int, wait_s: float) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.batches_run = 0  # engine.generate calls (tests and logs)
        self._inbox: queue.Queue = queue.Queue()
        self._carry: collections.deque[Job] = collections.deque()  # did not fit the last batch
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="openr1-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Job:
        if self._closing.is_set():
            raise RuntimeError("the server is shutting down")
        job = Job(request)
        self._inbox.put(job)
        return job

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        self._closing.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        for job in self._drain():  # never leave a handler waiting forever
            job.events.put(("error", 503, "the server is shutting down"))

    # ------------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closing.is_set():
            batch = self._collect()
            if batch:
                self._run(batch)

    def _collect(self) -> list[Job]:
        """The next batch: what is waiting now, plus what arrives within `wait_s`, up to the batch size in
        prompt rows (a single request larger than that runs alone; the engine splits it)."""
        first = self._carry.popleft() if self._carry else self._inbox.get()
        if first is None:
            return []
        batch, rows = [first], first.request.rows
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch_size:
            if self._carry:
                job = self._carry.popleft()
            else:
                left_s = deadline - time.monotonic()
                try:
                    job = self._inbox.get(timeout=left_s) if left_s > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    break
            if job is None:  # close(): finish this batch, then stop
                self._closing.set()
                break
            if rows + job.request.rows > self.max_batch_size:
                self._carry.appendleft(job)
                break
            batch.append(job)
            rows += job.request.rows
        return batch

    def _run(self, batch: list[Job]) -> None:
        try:
            self._generate(batch)
        except Exception as err:
            if len(batch) > 1 and not any(job.delivered for job in batch):
                # Find the culprit: rerun each request alone so the others still get their answer.
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), err)
                for job in batch:
                    self._run([job])
                return
            status = 400 if isinstance(err, UserError) else 500
            if status == 500:
                log.exception("engine.generate failed for %d request(s)", len(batch))
            message = str(err) if status == 400 else f"generation failed: {type(err).__name__}: {err}"
            for job in batch:
                job.events.put(("error", status, message))

    def _generate(self, batch: list[Job]) -> None:
        prompts, params, owner = [], [], []
        for job in batch:
            for p, ids in enumerate(job.request.prompts):
                prompts.append(ids)
                params.append(job.request.params)
                owner.append((job, p))

        def on_update(row: int, sample: int, text: str, finish_reason: str | None) -> None:
            job, p = owner[row]
            if job.request.stream and text:
                job.delivered = True
                job.events.put(("delta", p * job.request.params.n + sample, text))

        self.batches_run += 1
        outputs = self.engine.generate(prompts, params, on_update=on_update)
        at = 0
        for job in batch:
            count = len(job.request.prompts)
            job.events.put(("done", outputs[at : at + count]))
            at += count

    def _drain(self) -> list[Job]:
        jobs = list(self._carry)
        self._carry.clear()
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)
