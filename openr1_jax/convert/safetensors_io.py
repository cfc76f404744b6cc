"""Streaming, model-agnostic safetensors I/O for Hugging Face model folders.

We parse the safetensors format ourselves (8-byte little-endian header length, a JSON header of
``{name: {"dtype", "shape", "data_offsets"}}``, then the raw little-endian bytes) instead of going
through ``safetensors.safe_open(framework="numpy")``: that gives bfloat16 and float8 through
``ml_dtypes`` on every safetensors version, and lets a read touch exactly one tensor's bytes, so
converting a 700 GB checkpoint needs memory for one tensor, not one shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import ml_dtypes
import numpy as np

from openr1_jax.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype string <-> numpy dtype. Data on disk is always little-endian.
_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}

# The reference implementation refuses headers above 100 MB; a bigger one means a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _read_header(path: Path, file: BinaryIO) -> tuple[dict[str, dict[str, Any]], int]:
    """Return (tensor entries, byte offset where the data section starts) of an open shard."""
    prefix = file.read(8)
    if len(prefix) != 8:
        raise UserError(f"{path} is not a safetensors file: it is shorter than its 8-byte header length.")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES:
        raise UserError(f"{path} is not a safetensors file: its header claims {header_len} bytes.")
    try:
        header = json.loads(file.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a safetensors file: its header is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file: its header is not a JSON object.")
    header.pop("__metadata__", None)
    return header, 8 + header_len


class SafetensorsReader:
    """Lazy, read-only view of the tensors of a Hugging Face folder (sharded or single-file).

    Only headers are read up front; ``get`` reads one tensor's bytes with ``os.preadv`` (no shared
    file position, so concurrent ``get`` calls from threads are safe).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        self._index_metadata: dict[str, Any] = {}
        weight_map: dict[str, str] | None  # None: the single-file layout, every tensor in its header
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = dict(index["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index_path} is not a valid safetensors index ({e!r}).") from None
            self._index_metadata = index.get("metadata") or {}
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise UserError(f"Shard {shard} listed in {index_path} does not exist.")
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise UserError(f"{self.folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}.")

        self._files: dict[str, BinaryIO] = {}
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int, int]] = {}
        try:
            self._load_entries(weight_map)
        except BaseException:
            self.close()
            raise

    def _load_entries(self, weight_map: dict[str, str] | None) -> None:
        """Parse every shard header once; ``weight_map=None`` means the single-file layout."""
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        for shard in shards:
            path = self.folder / shard
            file = self._files[shard] = open(path, "rb")  # noqa: SIM115 - cached until close()
            header, data_start = _read_header(path, file)
            for name, entry in header.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # the index is authoritative: ignore strays it does not list here
                try:
                    dtype = _DTYPES[entry["dtype"]]
                    shape = tuple(int(d) for d in entry["shape"])
                    start, end = (int(o) for o in entry["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise UserError(f"Tensor {name} in {path} has a malformed or unsupported entry {entry}.") from None
                if end - start != dtype.itemsize * math.prod(shape):
                    raise UserError(f"Tensor {name} in {path} has data offsets that do not match its shape.")
                self._entries[name] = (shard, dtype, shape, data_start + start, end - start)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise UserError(
                    f"Tensor {missing[0]} is mapped to {weight_map[missing[0]]} by the index "
                    f"but that shard does not contain it ({len(missing)} missing in all)."
                )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. "BF16", "F32", "F8_E4M3"."""
        return _DTYPE_NAMES[self._entries[name][1]]

    def shard(self, name: str) -> str:
        """File name of the shard holding ``name`` (useful to group reads shard by shard)."""
        return self._entries[name][0]

    def metadata(self) -> dict[str, Any]:
        """The index's ``metadata`` block (e.g. ``total_size``); empty for a single-file folder."""
        return dict(self._index_metadata)

    def get(self, name: str) -> np.ndarray:
        """Read one tensor into a fresh array; only its own bytes are touched."""
        shard, dtype, shape, offset, nbytes = self._entries[name]
        out = np.empty(shape, dtype)
        buffer = memoryview(out.reshape(-1).view(np.uint8))
        fd = self._files[shard].fileno()
        done = 0
        while done < nbytes:  # a single read may return less (e.g. Linux caps reads near 2 GiB)
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got == 0:
                raise UserError(f"{self.folder / shard} is truncated: tensor {name} runs past its end.")
            done += got
        return out

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _storable(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` as a little-endian array of a dtype safetensors knows, or ValueError."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.dtype not in _DTYPE_NAMES:
        raise ValueError(f"Tensor {name} has dtype {array.dtype}, which safetensors cannot store.")
    return array


def save_safetensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray]) -> None:
    """Write one safetensors file; dtypes are those of ``_DTYPES`` (bfloat16/float8 via ml_dtypes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses other formats
    arrays = []
    offset = 0
    for name, array in tensors.items():
        array = _storable(name, array)
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # The format requires the data section to start 8-byte aligned; pad the JSON with spaces.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for array in arrays:
            # tobytes-free write: a C-contiguous view goes straight from the array's memory.
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


class ShardedSafetensorsWriter:
    """Stream tensors into a Hugging Face-style sharded folder, holding at most ~one shard in memory.

    Shards are written as ``model-00001.safetensors.partial`` while streaming, because the final
    ``-of-0000N`` suffix is unknown until the end; ``close()`` renames them and writes the index.
    A tensor bigger than ``max_shard_bytes`` gets a shard of its own. Added arrays are kept by
    reference (not copied) until their shard is written, so do not mutate them in between.
    """

    def __init__(self, folder: str | os.PathLike[str], max_shard_bytes: int = 5 * 10**9) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shard_of: dict[str, int] = {}  # tensor name -> 0-based shard number
        self._num_shards = 0
        self._total_size = 0
        self._closed = False

    def add(self, name: str, array: np.ndarray) -> None:
        if self._closed:
            raise ValueError(f"Cannot add {name}: the writer for {self.folder} is closed.")
        if name in self._shard_of or name in self._pending:
            raise ValueError(f"Tensor {name} was already added to {self.folder}.")
        array = _storable(name, array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes

    def _partial_path(self, shard: int) -> Path:
        return self.folder / f"model-{shard + 1:05d}.safetensors.partial"

    def _final_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self._num_shards:05d}.safetensors"

    def _flush(self) -> None:
        if not self._pending:
            return
        save_safetensors(self._partial_path(self._num_shards), self._pending)
        for name in self._pending:
            self._shard_of[name] = self._num_shards
        self._num_shards += 1
        self._total_size += self._pending_bytes
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> None:
        """Flush the last shard, give shards their final names and write the index. Idempotent."""
        if self._closed:
            return
        self._flush()
        for shard in range(self._num_shards):
            self._partial_path(shard).rename(self.folder / self._final_name(shard))
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {name: self._final_name(s) for name, s in sorted(self._shard_of.items())},
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On error leave the partial shards unindexed rather than publish an incomplete checkpoint.
        if exc_type is None:
            self.close()
