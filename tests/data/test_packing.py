"""Packing: row invariants, nothing lost or reordered, overlong policies, exact resume."""

from __future__ import annotations

import itertools
import json

import grain
import numpy as np
import pytest

from openr1_jax.data.packing import BatchedRowsIterDataset, PackedIterDataset

PAD = 99
T = 16


def make_examples(n: int, seed: int = 0, max_len: int = 24) -> list[tuple[np.ndarray, np.ndarray]]:
    """Examples with distinct ids; the mask trains a random suffix (like an answer after a prompt)."""
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        ids = np.arange(next_id, next_id + length, dtype=np.int32) % 1000 + 100
        next_id += length
        mask = (np.arange(length) >= rng.integers(0, length)).astype(np.int32)
        if rng.random() < 0.1:  # a prompt without answer: nothing to train on
            mask[:] = 0
        out.append((ids, mask))
    return out


def pack(examples, *, seq_len=T, overlong="truncate", pack=True):
    ds = PackedIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(), seq_len, pad_id=PAD, overlong=overlong, pack=pack
    )
    it = iter(ds)
    return list(it), it.stats


def segments(row, pad_id: int = PAD):
    """[(ids, mask)] of the packed examples of one row, checking the row's invariants on the way."""
    seg, pos = row["segment_ids"], row["positions"]
    n = int(seg.max())
    used = int((seg > 0).sum())
    assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0), "examples first, padding last"
    assert np.all(np.diff(seg[:used]) >= 0) and set(seg[:used]) == set(range(1, n + 1)), "segments 1..n in order"
    assert np.all(row["input_ids"][used:] == pad_id) and np.all(row["loss_mask"][used:] == 0)
    assert np.all(pos[used:] == 0)
    out = []
    for s in range(1, n + 1):
        (where,) = np.nonzero(seg == s)
        np.testing.assert_array_equal(pos[where], np.arange(len(where)), err_msg="positions restart per example")
        out.append((row["input_ids"][where], row["loss_mask"][where]))
    return out


def expected_after_policy(examples, overlong, seq_len=T):
    kept, truncated, dropped = [], 0, 0
    for ids, mask in examples:
        if len(ids) > seq_len:
            if overlong == "drop":
                dropped += 1
                continue
            ids, mask, truncated = ids[:seq_len], mask[:seq_len], truncated + 1
        if mask.sum() == 0:
            dropped += 1
            continue
        kept.append((ids, mask))
    return kept, truncated, dropped


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_packing_invariants_and_nothing_lost(overlong):
    examples = make_examples(60)
    rows, stats = pack(examples, overlong=overlong)
    kept, truncated, dropped = expected_after_policy(examples, overlong)
    assert dropped > 0 and (truncated > 0) == (overlong == "truncate"), "the draw must exercise the counters"
    assert stats["truncated"] == truncated and stats["dropped"] == dropped and stats["examples"] == len(examples)
    got = [part for row in rows for part in segments(row)]
    assert len(got) == len(kept)
    for (ids, mask), (want_ids, want_mask) in zip(got, kept):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
    # Sequential packing: a row ends only because the next example did not fit.
    for row, nxt in itertools.pairwise(rows):
        free = int((row["segment_ids"] == 0).sum())
        assert int((nxt["segment_ids"] == 1).sum()) > free
    assert stats["rows"] == len(rows)
    assert stats["trained_tokens"] == sum(int(m.sum()) for _, m in kept)
    assert all(v.dtype == np.int32 and v.shape == (T,) for row in rows for v in row.values())


def test_truncation_that_removes_all_trained_tokens_drops_the_example():
    prompt_only_head = (np.arange(T + 4, dtype=np.int32), np.r_[np.zeros(T, np.int32), np.ones(4, np.int32)])
    ok = (np.arange(3, dtype=np.int32), np.ones(3, np.int32))
    rows, stats = pack([prompt_only_head, ok])
    assert stats["truncated"] == 1 and stats["dropped"] == 1 and len(rows) == 1
    np.testing.assert_array_equal(rows[0]["input_ids"][:3], ok[0])


def test_no_packing_gives_one_example_per_row():
    examples = make_examples(20, seed=1)
    rows, stats = pack(examples, pack=False)
    kept, truncated, dropped = expected_after_policy(examples, "truncate")
    assert len(rows) == len(kept) and stats["truncated"] == truncated and stats["dropped"] == dropped
    for row, (ids, _) in zip(rows, kept):
        parts = segments(row)
        assert len(parts) == 1
        np.testing.assert_array_equal(parts[0][0], ids)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_exact_resume_at_every_row(pack_rows):
    examples = make_examples(40, seed=2)
    ds = PackedIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(), T, pad_id=PAD, overlong="truncate", pack=pack_rows
    )
    full = iter(ds)
    reference = list(full)
    it = iter(ds)
    for k in range(len(reference)):
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(ds)
        resumed.set_state(state)
        rest = list(resumed)
        assert len(rest) == len(reference) - k
        for a, b in zip(rest, reference[k:]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert resumed.stats == full.stats  # counters resume too
        next(it)


def test_batches_stack_rows_and_pad_the_last_batch_with_empty_rows():
    examples = make_examples(30, seed=3)
    rows, _ = pack(examples)
    packed = PackedIterDataset(grain.MapDataset.source(examples).to_iter_dataset(), T, pad_id=PAD)
    batches = list(iter(BatchedRowsIterDataset(packed, 4, pad_id=PAD)))
    assert len(batches) == -(-len(rows) // 4)
    assert all(b[k].shape == (4, T) and b[k].dtype == np.int32 for b in batches for k in b)
    flat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    for i, row in enumerate(rows):
        for k in row:
            np.testing.assert_array_equal(flat[k][i], row[k])
    filler = slice(len(rows), None)
    assert np.all(flat["segment_ids"][filler] == 0) and np.all(flat["loss_mask"][filler] == 0)
    assert np.all(flat["input_ids"][filler] == PAD)
