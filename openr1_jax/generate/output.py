"""The resumable JSONL output: one line per dataset row, appended and fsync'ed batch by batch.

A kill can leave at most a partial last line (a write cut short); opening the file again truncates it back to
the last newline, so every line that remains is a complete record. Rows whose record carries an `error` are
dropped on reopening (the file is rewritten without them, atomically) and generated again. A sidecar
`<output>.meta.json` holds the settings that shape the records (dataset, template, sampling, model, filters);
resuming with different ones is refused, so one file never mixes two recipes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openr1_jax.errors import UserError
from openr1_jax.fileio import atomic_file
from openr1_jax.generate.prompts import id_key


class JsonlOutput:
    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], resume: bool):
        self.path = Path(path).expanduser()
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.done: set[str] = set()  # id keys of rows with a finished (error-free) record
        self.dropped_errors = 0  # error records removed for another try
        self._fingerprint = fingerprint
        if self.path.is_dir():
            raise UserError(f"output_path {self.path} is a folder; name a .jsonl file")
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise UserError(f"output_path {self.path} already exists; remove it or set resume=true to continue it")
            self._check_meta()
            self._recover()
        self._file = None

    # ------------------------------------------------------------------------------------------------------
    def _check_meta(self) -> None:
        if not self.meta_path.is_file():
            return  # a file from elsewhere: trust it, the meta is written on the first append
        try:
            before = json.loads(self.meta_path.read_text(encoding="utf-8")).get("fingerprint", {})
        except (OSError, json.JSONDecodeError):
            return
        now = json.loads(json.dumps(self._fingerprint))
        changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            k = changed[0]
            raise UserError(
                f"output_path {self.path} was generated with {k}={before.get(k)!r}, not {now.get(k)!r}"
                f"{f' (and {len(changed) - 1} more settings)' if len(changed) > 1 else ''}; "
                "choose another output_path or remove the file to start over"
            )

    def _recover(self) -> None:
        """Truncate a partial last line, read the finished ids, rewrite without error records (streaming: a
        distillation file can be larger than memory)."""
        _truncate_partial_line(self.path)
        errors = 0
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                record = self._parse(line, line_no)
                if record is None:
                    continue
                if record.get("error"):
                    errors += 1
                else:
                    self.done.add(id_key(record["id"]))
        if errors:
            with atomic_file(self.path) as tmp, open(self.path, "rb") as src, open(tmp, "wb") as dst:
                for line_no, line in enumerate(src, 1):
                    record = self._parse(line, line_no)
                    if record is not None and not record.get("error"):
                        dst.write(line)
            _fsync_dir(self.path.parent)
        self.dropped_errors = errors

    def _parse(self, line: bytes, line_no: int) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(
                f"line {line_no} of {self.path} is not valid JSON; the file is damaged (remove that line to resume)"
            ) from None
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(f"line {line_no} of {self.path} is not a generate record (it has no 'id')")
        return record

    # ------------------------------------------------------------------------------------------------------
    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write whole lines in one write, then flush and fsync: a kill keeps every earlier batch."""
        records = list(records)
        lines = [json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records]
        if not lines:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_meta()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across batches
        self._file.write("".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        for r in records:
            if not r.get("error"):
                self.done.add(id_key(r["id"]))

    def _write_meta(self) -> None:
        with atomic_file(self.meta_path) as tmp:
            tmp.write_text(json.dumps({"fingerprint": self._fingerprint}, indent=2, default=str) + "\n", "utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_partial_line(path: Path, block: int = 1 << 16) -> None:
    """Cut the file back to just after its last newline (nothing, if it holds no complete line)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos, end = size, 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            pos = start
        if end < size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
