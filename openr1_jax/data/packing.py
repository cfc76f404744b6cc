"""Sequential packing of tokenized examples into rows of T tokens, and batching rows into [B, T].

A row holds whole examples one after another (segment ids 1, 2, ...; positions restart at 0 per example);
an example that does not fit the rest of the row starts the next one and the rest is padding (segment 0).
Nothing is split across rows, so no example ever sees another's tokens or loses its beginning.

Exact resume: between two `next` calls the packer holds at most one example, the one that did not fit. Its
state is the parent's state taken *before* that example was read (with the per-example counters of that
moment), so after `set_state` the parent yields it again and the stream continues bit-identically.
"""

from __future__ import annotations

from typing import Any, Literal

import grain
import numpy as np

from openr1_jax.errors import UserError

EXAMPLE_COUNTERS = ("examples", "truncated", "dropped")  # counted when an example is read
COUNTERS = (*EXAMPLE_COUNTERS, "rows", "tokens", "trained_tokens")  # the rest when a row is emitted
ROW_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")
Example = tuple[np.ndarray, np.ndarray]  # (input_ids [n], loss_mask [n])


class PackedIterDataset(grain.IterDataset):
    """Tokenized examples (input_ids, loss_mask) -> row dicts of int32 [T] (see ROW_KEYS)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        seq_len: int,
        *,
        pad_id: int,
        overlong: Literal["truncate", "drop"] = "truncate",
        pack: bool = True,
        max_consecutive_drops: int | None = None,
    ):
        """`max_consecutive_drops`: raise UserError after this many dropped examples in a row (e.g. one epoch),
        instead of spinning forever on an infinite stream in which nothing fits."""
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self._seq_len, self._pad_id, self._overlong, self._pack = seq_len, pad_id, overlong, pack
        self._max_drops = max_consecutive_drops

    def __iter__(self) -> PackingIterator:
        return PackingIterator(
            self._parent.__iter__(),
            self._seq_len,
            pad_id=self._pad_id,
            overlong=self._overlong,
            pack=self._pack,
            max_consecutive_drops=self._max_drops,
        )

    def __str__(self) -> str:
        return f"PackedIterDataset(seq_len={self._seq_len}, overlong={self._overlong}, pack={self._pack})"


class PackingIterator(grain.DatasetIterator):
    """Iterator of PackedIterDataset; `stats` counts examples read, truncated, dropped, rows and tokens."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        seq_len: int,
        *,
        pad_id: int,
        overlong: Literal["truncate", "drop"],
        pack: bool,
        max_consecutive_drops: int | None = None,
    ):
        super().__init__(parent)
        self._seq_len, self._pad_id, self._overlong, self._pack = seq_len, pad_id, overlong, pack
        self._max_drops = max_consecutive_drops
        self._drops_in_a_row = 0
        self._counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # (example, parent state before reading it, counters before reading it) of the example that did not fit
        self._carry: tuple[Example, dict[str, Any], dict[str, int]] | None = None

    def _prepare(self, example: Example) -> Example | None:
        """Counts the example, applies the overlong policy; None when it is dropped."""
        ids, mask = (np.asarray(a, np.int32).reshape(-1) for a in example)
        self._counts["examples"] += 1
        if len(ids) > self._seq_len:
            if self._overlong == "drop":
                return self._drop()
            ids, mask = ids[: self._seq_len], mask[: self._seq_len]
            self._counts["truncated"] += 1
        if not mask.any():  # nothing to learn from (e.g. the answer was cut off)
            return self._drop()
        self._drops_in_a_row = 0
        return ids, mask

    def _drop(self) -> None:
        self._counts["dropped"] += 1
        self._drops_in_a_row += 1
        if self._max_drops is not None and self._drops_in_a_row >= self._max_drops:
            if self._overlong == "drop":
                fix = "raise data.seq_len or use data.overlong=truncate"
            else:  # truncation cut every trained token: the prompt (or a system prompt) alone fills the row
                fix = "their prompts fill the whole row, so raise data.seq_len or shorten the prompts/system prompt"
            raise UserError(
                f"{self._drops_in_a_row} examples in a row were dropped: none keeps a trained token within "
                f"data.seq_len={self._seq_len} (overlong={self._overlong}); {fix}."
            )

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        parts: list[Example] = []
        used = 0
        while True:
            if self._carry is not None:
                example, _, _ = self._carry
                self._carry = None
            else:
                parent_state, counters = self._parent.get_state(), dict(self._counts)
                try:
                    raw = next(self._parent)
                except StopIteration:
                    if parts:
                        break
                    raise
                example = self._prepare(raw)
                if example is None:
                    continue
                if parts and used + len(example[0]) > self._seq_len:
                    self._carry = (example, parent_state, counters)
                    break
            parts.append(example)
            used += len(example[0])
            if not self._pack or used == self._seq_len:
                break
        return self._make_row(parts)

    def _make_row(self, parts: list[Example]) -> dict[str, np.ndarray]:
        T = self._seq_len
        row = {
            "input_ids": np.full(T, self._pad_id, np.int32),
            "segment_ids": np.zeros(T, np.int32),
            "positions": np.zeros(T, np.int32),
            "loss_mask": np.zeros(T, np.int32),
        }
        start = 0
        for segment, (ids, mask) in enumerate(parts, 1):
            end = start + len(ids)
            row["input_ids"][start:end] = ids
            row["segment_ids"][start:end] = segment
            row["positions"][start:end] = np.arange(len(ids), dtype=np.int32)
            row["loss_mask"][start:end] = mask
            start = end
        self._counts["rows"] += 1
        self._counts["tokens"] += start
        self._counts["trained_tokens"] += int(row["loss_mask"].sum())
        return row

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the examples in emitted rows (or dropped); the carried example is not counted yet."""
        if self._carry is None:
            return dict(self._counts)
        # It will be read and counted again after a resume; the rows before it were already emitted.
        return {**self._counts, **{k: self._carry[2][k] for k in EXAMPLE_COUNTERS}}

    def get_state(self) -> dict[str, Any]:
        parent_state = self._parent.get_state() if self._carry is None else self._carry[1]
        return {"parent": parent_state, "stats": self.stats}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {k: int(state["stats"].get(k, 0)) for k in COUNTERS}
        self._carry = None
        self._drops_in_a_row = 0

    def __str__(self) -> str:
        return f"PackingIterator(seq_len={self._seq_len})"


class BatchedRowsIterDataset(grain.IterDataset):
    """Rows -> batches of `batch_size` rows stacked to [B, T]; a short last batch is filled with empty rows.

    Empty rows (segment 0, loss_mask 0) carry no weight in the loss, so nothing is lost and shapes stay static.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, *, pad_id: int):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._batch_size, self._pad_id = batch_size, pad_id

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self._batch_size, pad_id=self._pad_id)

    def __str__(self) -> str:
        return f"BatchedRowsIterDataset(batch_size={self._batch_size})"


class BatchIterator(grain.DatasetIterator):
    """Iterator of BatchedRowsIterDataset; holds no rows between calls, so its state is its parent's."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, *, pad_id: int):
        super().__init__(parent)
        self._batch_size, self._pad_id = batch_size, pad_id
        self.batches = 0

    @property
    def stats(self) -> dict[str, int]:
        return {**getattr(self._parent, "stats", {}), "batches": self.batches}

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        rows = []
        for _ in range(self._batch_size):
            try:
                rows.append(next(self._parent))
            except StopIteration:
                break
        if not rows:
            raise StopIteration
        while len(rows) < self._batch_size:
            rows.append({k: np.full_like(v, self._pad_id if k == "input_ids" else 0) for k, v in rows[0].items()})
        self.batches += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.batches = int(state["batches"])
