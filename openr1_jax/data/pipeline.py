"""The SFT input pipeline: sources -> weighted mixture -> shuffle -> per-process shard -> repeat -> tokenize ->
pack -> batch, as one grain iterator whose state resumes exactly.

Everything before tokenization is index arithmetic on grain MapDatasets, so each process reads only the
examples of its shard and an epoch is a fresh permutation (grain reseeds shuffles with the epoch number).
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from openr1_jax.data.chat import pad_id, tokenize_example
from openr1_jax.data.config import DataConfig
from openr1_jax.data.packing import BatchedRowsIterDataset, PackedIterDataset
from openr1_jax.data.sources import load_source
from openr1_jax.errors import UserError


def example_dataset(
    cfg: DataConfig, *, seed: int = 0, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """One epoch of this process's rows (canonical keys), mixed by weight and shuffled; not yet repeated.

    Each source is shuffled before mixing so that a dataset larger than its share contributes different rows
    in each epoch; the mixture is shuffled again so the sources interleave randomly rather than in a pattern.
    """
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index must be in [0, {process_count}), got {process_index}.")
    seeds = [int(s) for s in np.random.SeedSequence([cfg.shuffle_seed, seed]).generate_state(len(cfg.datasets) + 1)]
    parts = [grain.MapDataset.source(load_source(spec)).shuffle(seed=s) for spec, s in zip(cfg.datasets, seeds[1:])]
    if len(parts) == 1:
        mixed = parts[0]
    else:
        mixed = grain.MapDataset.mix(parts, weights=[spec.weight for spec in cfg.datasets])
    shard = mixed.shuffle(seed=seeds[0])[process_index::process_count]
    if len(shard) == 0:
        raise UserError(
            f"the data mixture has {len(mixed)} examples per epoch, fewer than the {process_count} processes."
        )
    return shard


def sft_iterator(
    cfg: DataConfig,
    tokenizer,
    batch_size: int,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    num_threads: int = 0,
) -> SFTIterator:
    """Batches of this process's packed rows: dict of int32 [batch_size, cfg.seq_len] (the batch format).

    `num_epochs=None` repeats forever. `num_threads` > 0 tokenizes ahead in threads; keep 0 for tokenizers
    that are not thread-safe (Hugging Face fast tokenizers may raise "Already borrowed" when shared).
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}.")
    if num_epochs is not None and num_epochs < 1:
        raise UserError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    shard = example_dataset(cfg, seed=seed, process_index=process_index, process_count=process_count)
    examples = shard.repeat(num_epochs).map(functools.partial(tokenize_example, tokenizer=tokenizer, cfg=cfg))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
    pad = pad_id(tokenizer)
    rows = PackedIterDataset(
        examples.to_iter_dataset(read),
        cfg.seq_len,
        pad_id=pad,
        overlong=cfg.overlong,
        pack=cfg.pack,
        # Two epochs' worth of drops in a row: nothing in the mixture can ever fill a row.
        max_consecutive_drops=None if num_epochs is not None else 2 * len(shard),
    )
    batches = BatchedRowsIterDataset(rows, batch_size, pad_id=pad)
    return SFTIterator(batches.__iter__(), examples_per_epoch=len(shard), process_count=process_count)


class SFTIterator(grain.DatasetIterator):
    """The pipeline's iterator: batches, exact `get_state`/`set_state`, and `stats` for logging.

    `stats`: examples (read by this process), truncated, dropped, rows, tokens, trained_tokens, batches,
    epoch (completed passes over this process's shard).
    """

    def __init__(self, parent: grain.DatasetIterator, *, examples_per_epoch: int, process_count: int):
        super().__init__(parent)
        self.examples_per_epoch = examples_per_epoch
        self._process_count = process_count

    @property
    def stats(self) -> dict[str, int]:
        stats = dict(self._parent.stats)
        stats["epoch"] = stats.get("examples", 0) // self.examples_per_epoch
        return stats

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "process_count": self._process_count}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("process_count") != self._process_count:
            raise UserError(
                f"the data iterator state was saved with {state.get('process_count')} processes but this run has "
                f"{self._process_count}; resume with the same number of processes."
            )
        self._parent.set_state(state["parent"])

    def __str__(self) -> str:
        return f"SFTIterator(examples_per_epoch={self.examples_per_epoch})"
