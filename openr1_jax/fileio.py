"""Output folders and files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from openr1_jax.errors import UserError


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, all_processes: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out_dir` only if the block succeeds.

    A failure (or a kill) leaves `out_dir` untouched: either absent or the previous complete version.
    `all_processes=True` is for writes that every JAX process of a multi-host job takes part in (an orbax save
    to a filesystem they share): they all get the same temporary folder, process 0 creates and renames it, and
    the others wait at barriers.
    """
    multi = main = False
    if all_processes:
        import jax

        multi = jax.process_count() > 1
    main = not multi or jax.process_index() == 0
    out = Path(out_dir).expanduser().absolute()  # orbax refuses relative paths
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; remove it or choose another path")
    tag = "multihost" if multi else uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a multi-host leftover of a killed job
        tmp.mkdir()
    _barrier(multi, f"atomic_dir:create:{out}")
    try:
        yield tmp
        _barrier(multi, f"atomic_dir:written:{out}")
        if main:
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        _barrier(multi, f"atomic_dir:renamed:{out}")
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is fsynced and renamed over `path`, so readers
    (and a run killed mid-write) see the old file or the new one, never half of one."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _barrier(multi: bool, name: str) -> None:
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
