"""Training checkpoints (orbax) and clean stops on preemption.

A checkpoint is one step folder `<directory>/<step>/` holding three orbax items:
- `state`: the TrainState pytree (StandardSave); restored onto abstract arrays that carry shardings, so every
  array lands where the caller's mesh wants it, on any number of hosts.
- `data`: the grain iterator state, one JSON file per process (`process_<i>-of-<n>.json`, grain's handler).
- `meta`: JSON written by the primary process: `step` plus whatever the loop passes (config, tokens seen...).

Atomicity (orbax-checkpoint 0.12.8, checked in tests/train/test_checkpointing.py): a save writes into
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only after every item is written and a
`commit_success.txt` marker is in it; on GCS (no atomic rename) it writes into `<step>/` and the marker is
written last. Step discovery (`latest_step`) only accepts names matching `^\\d+$` that pass that finalisation
check, so a save killed at any point leaves the previous checkpoint as the latest. Leftover tmp folders are
removed when the next Checkpointer opens the directory.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from grain.checkpoint import CheckpointHandler as GrainCheckpointHandler
from grain.checkpoint import CheckpointRestore as GrainCheckpointRestore
from grain.checkpoint import CheckpointSave as GrainCheckpointSave
from jax.experimental import multihost_utils

from openr1_jax.errors import UserError

STATE, DATA, META = "state", "data", "meta"


@dataclass(frozen=True)
class CheckpointConfig:
    """When to save and how many checkpoints to keep (names follow Hugging Face's Trainer)."""

    save_steps: int = field(default=500, metadata={"help": "save every N optimizer steps; 0 = only at the end"})
    save_total_limit: int | None = field(
        default=3, metadata={"help": "keep only the last K checkpoints; null keeps all"}
    )
    async_save: bool = field(
        default=True, metadata={"help": "write checkpoints in a background thread while training goes on"}
    )

    def __post_init__(self):
        if self.save_steps < 0:
            raise UserError(f"checkpoint.save_steps must be >= 0 (0 = only at the end), got {self.save_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UserError(f"checkpoint.save_total_limit must be >= 1 or null (keep all), got {self.save_total_limit}")


def _as_path(directory: str | os.PathLike) -> epath.Path:
    text = os.fspath(directory)
    # orbax wants absolute paths; remote URLs (gs://...) already are.
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _abstract(tree: Any) -> Any:
    """Concrete jax arrays in a restore target become ShapeDtypeStructs with the same sharding."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _check_iterator(data_iterator: Any) -> None:
    # grain's handler serialises DatasetIterator states as JSON and DataLoaderIterator states as bytes.
    if not isinstance(data_iterator, grain.DatasetIterator | grain.DataLoaderIterator):
        raise TypeError(
            f"data_iterator must be a grain DatasetIterator or DataLoaderIterator, got {type(data_iterator)}"
        )


class Checkpointer:
    """Save/restore TrainState + data-iterator state + JSON metadata under `directory` (an orbax manager).

    `directory` is the checkpoints folder itself (the loop passes `<output_dir>/checkpoints`). Every method
    must be called by all processes at the same steps: orbax synchronises processes inside save/restore.
    """

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig()):
        self.cfg = cfg
        self.directory = _as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.save_total_limit,
            enable_async_checkpointing=cfg.async_save,
            # A save killed mid-way leaves `<step>.orbax-checkpoint-tmp`; drop it when we reopen.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: GrainCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    # ------------------------------------------------------------------------------------------------------
    def is_due(self, step: int) -> bool:
        """True at every `save_steps`-th step (never when save_steps is 0)."""
        return self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0

    def maybe_save(
        self,
        step: int,
        state: Any,
        data_iterator: Any = None,
        meta: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save if `step` is due (or `force`) and not already saved; returns whether a save started.

        With async_save the call returns once arrays are copied off the devices and the iterator state is
        written: the caller may donate/overwrite `state` and advance the iterator right away.
        """
        if not (force or self.is_due(step)) or step in self._manager.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave({**(meta or {}), "step": step})}
        if data_iterator is not None:
            _check_iterator(data_iterator)
            items[DATA] = GrainCheckpointSave(data_iterator)
        # Our own schedule decided; force skips orbax's policy (which would also save the very first step).
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def start_or_resume(self, resume: bool, state: Any, data_iterator: Any = None) -> tuple[Any, int]:
        """(state, step) to start the loop from: the latest checkpoint's when `resume` and there is one, else
        `state` and 0. A folder that holds checkpoints while `resume` is off is refused (nothing is overwritten)."""
        if self.latest_step() is None:
            return state, 0
        if not resume:
            self.close()
            raise UserError(
                f"{self.directory.parent} already holds checkpoints; pass resume=true or choose another output_dir"
            )
        state, _ = self.restore(None, state, data_iterator)
        return state, int(state.step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (including saves of this process still committing)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
        """Load checkpoint `step` (None = latest) onto `abstract_state`'s shapes, dtypes and shardings.

        `abstract_state` is a TrainState of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (concrete
        arrays are accepted and only their sharding is used). The data iterator's state is set in place.
        Returns (state, meta).
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise UserError(f"no complete checkpoint to resume from in {self.directory}")
            step = steps[-1]
        if step not in steps:
            raise UserError(f"checkpoint step {step} not found in {self.directory}; available steps: {steps}")
        items = {STATE: ocp.args.StandardRestore(_abstract(abstract_state)), META: ocp.args.JsonRestore()}
        if data_iterator is not None:
            _check_iterator(data_iterator)
            if not (self.directory / str(step) / DATA).exists():
                raise UserError(
                    f"checkpoint {self.directory / str(step)} has no data-iterator state to resume the data from"
                )
            items[DATA] = GrainCheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], dict(restored[META])

    def wait(self) -> None:
        """Block until pending async saves are committed (raises if one failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------------------
class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the training loop polls, so it can save and exit between steps.

    Single process: the guard's own handlers set `.requested`; `should_stop(step)` returns it.
    Several processes (TPU pods, `jax.distributed.initialize`): hosts must stop at the *same* step or the next
    collective deadlocks, so `should_stop(step)` asks jax's preemption sync manager
    (`multihost_utils.reached_preemption_sync_point`, the same call as orbax's `reached_preemption`), which
    catches SIGTERM itself (TPU maintenance events / GKE evictions arrive as SIGTERM) and agrees on the first
    step after every host has seen the notice. The guard then installs no handler (it would replace jax's
    SIGTERM notifier, and a host-local SIGINT flag cannot stop all hosts at one step). If the preemption
    service is disabled (`jax_enable_preemption_service=False`), the guard's flag is OR-reduced over
    processes at every `should_stop` call (a small host all-gather).
    Call `should_stop` at every step on every process.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._use_jax_sync = False

    @property
    def requested(self) -> bool:
        """A signal reached this process (single-process and all-gather modes)."""
        return self._event.is_set()

    @property
    def mode(self) -> str:
        """How stops are decided: "local" (one process), "jax_sync" (jax's preemption service), "allgather"."""
        if jax.process_count() == 1:
            return "local"
        return "jax_sync" if self._use_jax_sync else "allgather"

    def _handler(self, signum, frame) -> None:
        # Only set a flag: the loop stops between steps, never in the middle of a dispatch or a save.
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        multi = jax.process_count() > 1
        self._use_jax_sync = multi and bool(jax.config.jax_enable_preemption_service)
        # With jax's sync manager a host-local flag could never be acted on safely: leave signals alone.
        installed = () if self._use_jax_sync else self.signals
        if threading.current_thread() is threading.main_thread():  # signal.signal only works there
            for s in installed:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """True when the loop should save (force) and exit after `step`; identical on all processes."""
        if jax.process_count() == 1:
            return self.requested
        stop = False
        if self._use_jax_sync:
            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # sync manager not initialised: fall back to the flag below
                self._use_jax_sync = False
        if not self._use_jax_sync:
            flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
            stop = bool(np.max(flags))
        return stop
