"""Output folders that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from openr1_jax.errors import UserError


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `out_dir` only if the block succeeds.

    A failure (or a kill) leaves `out_dir` untouched: either absent or the previous complete version.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
