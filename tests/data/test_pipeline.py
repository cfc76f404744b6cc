"""The whole SFT pipeline: mixture weights, seeded shuffles, per-process shards, exact resume."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from openr1_jax.data.chat import load_tokenizer
from openr1_jax.data.config import DataConfig, DatasetSpec
from openr1_jax.data.pipeline import example_dataset, sft_iterator
from openr1_jax.errors import UserError
from tests.data.test_chat import build_tokenizer
from tests.data.test_packing import segments
from tests.data.test_sources import write_jsonl

T = 130  # two examples (61-68 tokens) per row


def conversation(tag: str) -> dict:
    n = int(tag[1:])
    return {
        "messages": [
            {"role": "user", "content": f"What is {tag}?"},
            {"role": "assistant", "content": f"<think> {n}+{n}={2 * n} </think> \\boxed{{{2 * n}}}"},
        ]
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    tokenizer_dir = build_tokenizer(str(tmp / "tok"))
    a = write_jsonl(tmp / "a.jsonl", [conversation(f"A{i}") for i in range(90)])
    b = write_jsonl(tmp / "b.jsonl", [conversation(f"B{i}") for i in range(60)])
    small = write_jsonl(tmp / "small.jsonl", [conversation(f"S{i}") for i in range(21)])
    return {"tok": tokenizer_dir, "a": a, "b": b, "small": small}


def tag_of(row: dict) -> str:
    return re.search(r"What is (\w+)\?", row["messages"][0]["content"]).group(1)


def tags_in_batch(batch: dict, tokenizer) -> list[str]:
    out = []
    for b in range(batch["input_ids"].shape[0]):
        row = {k: v[b] for k, v in batch.items()}
        for ids, _ in segments(row, pad_id=tokenizer.pad_token_id):
            out.append(re.search(r"What is (\w+)\?", tokenizer.decode(ids)).group(1))
    return out


def test_batches_follow_the_contract(env):
    cfg = DataConfig(datasets=[DatasetSpec(path=env["small"])], tokenizer=env["tok"], seq_len=T)
    tok = load_tokenizer(cfg)
    it = sft_iterator(cfg, tok, batch_size=3, num_epochs=1)
    batches = list(it)
    for batch in batches:
        assert set(batch) == {"input_ids", "segment_ids", "positions", "loss_mask"}
        assert all(v.shape == (3, T) and v.dtype == np.int32 for v in batch.values())
    tags = [t for batch in batches for t in tags_in_batch(batch, tok)]
    assert sorted(tags) == sorted(f"S{i}" for i in range(21)), "one epoch = every example once"
    stats = it.stats
    assert stats["examples"] == 21 and stats["epoch"] == 1 and stats["dropped"] == 0
    assert stats["batches"] == len(batches) and stats["rows"] <= 3 * len(batches)


def test_mixture_proportions_match_weights(env):
    specs = [DatasetSpec(path=env["a"], weight=3.0), DatasetSpec(path=env["b"], weight=1.0)]
    ds = example_dataset(DataConfig(datasets=specs, tokenizer=env["tok"]))
    # 90 rows at 3/4 of the mixture: an epoch is 120 examples, 90 from A and 30 from B.
    assert len(ds) == 120
    three_epochs = [tag_of(ds[i])[0] for i in range(3 * len(ds))]
    counts = collections.Counter(three_epochs)
    assert abs(counts["A"] / len(three_epochs) - 0.75) < 0.02
    # The mixture is shuffled: B examples are spread out, not clustered at a fixed stride.
    first_epoch = three_epochs[: len(ds)]
    assert collections.Counter(first_epoch[:60])["B"] not in (0, 30)
    # B is larger than its share, so later epochs bring B rows the first epoch did not use.
    b_epoch0 = {tag_of(ds[i]) for i in range(len(ds)) if tag_of(ds[i]).startswith("B")}
    b_later = {tag_of(ds[i]) for i in range(len(ds), 3 * len(ds)) if tag_of(ds[i]).startswith("B")}
    assert b_later - b_epoch0


def test_shuffle_is_deterministic_by_seed_and_reshuffled_per_epoch(env):
    def order(shuffle_seed=0, seed=0, start=0):
        cfg = DataConfig(datasets=[DatasetSpec(path=env["small"])], tokenizer=env["tok"], shuffle_seed=shuffle_seed)
        ds = example_dataset(cfg, seed=seed)
        return [tag_of(ds[i]) for i in range(start, start + len(ds))]

    assert order() == order()
    assert order() != order(shuffle_seed=1) and order() != order(seed=1)
    assert order() != order(start=21) and sorted(order()) == sorted(order(start=21)), "epoch 2: new permutation"
    assert order() != sorted(order(), key=lambda t: int(t[1:]))


def test_processes_read_disjoint_shards_that_cover_the_data(env):
    cfg = DataConfig(datasets=[DatasetSpec(path=env["small"])], tokenizer=env["tok"], seq_len=T)
    tok = load_tokenizer(cfg)
    per_process = []
    for p in range(2):
        it = sft_iterator(cfg, tok, batch_size=2, process_index=p, process_count=2, num_epochs=1)
        per_process.append([t for batch in it for t in tags_in_batch(batch, tok)])
    a, b = map(set, per_process)
    assert not a & b and a | b == {f"S{i}" for i in range(21)}
    assert {len(a), len(b)} == {10, 11}
    with pytest.raises(UserError, match="process_index"):
        example_dataset(cfg, process_index=2, process_count=2)


@pytest.mark.parametrize("pack", [True, False])
def test_exact_resume_matches_uninterrupted(env, pack):
    specs = [DatasetSpec(path=env["small"]), DatasetSpec(path=env["b"], weight=0.5, max_examples=8)]
    cfg = DataConfig(datasets=specs, tokenizer=env["tok"], seq_len=T, pack=pack)
    tok = load_tokenizer(cfg)
    reference = sft_iterator(cfg, tok, batch_size=2, seed=3)
    expected = [next(reference) for _ in range(25)]  # runs past several epochs of the 24-example mixture
    for k in (0, 4, 11):
        it = sft_iterator(cfg, tok, batch_size=2, seed=3)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = sft_iterator(cfg, tok, batch_size=2, seed=3)
        resumed.set_state(state)
        assert resumed.stats == it.stats
        for want in expected[k : k + 6]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert reference.stats["epoch"] >= 2


def test_resume_with_another_process_count_is_a_user_error(env):
    cfg = DataConfig(datasets=[DatasetSpec(path=env["small"])], tokenizer=env["tok"], seq_len=T)
    tok = load_tokenizer(cfg)
    state = sft_iterator(cfg, tok, batch_size=2).get_state()
    other = sft_iterator(cfg, tok, batch_size=2, process_index=1, process_count=2)
    with pytest.raises(UserError, match="saved with 1 processes but this run has 2"):
        other.set_state(state)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_examples_are_counted_and_an_all_dropped_mixture_is_a_user_error(env, overlong):
    # 24 tokens hold the system prompt and the question but not the answer: truncated examples train nothing.
    cfg = DataConfig(datasets=[DatasetSpec(path=env["small"])], tokenizer=env["tok"], seq_len=24, overlong=overlong)
    tok = load_tokenizer(cfg)
    it = sft_iterator(cfg, tok, batch_size=2, num_epochs=1)
    assert list(it) == []
    assert it.stats["dropped"] == 21 and it.stats["truncated"] == (21 if overlong == "truncate" else 0)
    with pytest.raises(UserError, match=r"data\.seq_len"):
        next(sft_iterator(cfg, tok, batch_size=2))  # forever would otherwise spin without a batch
