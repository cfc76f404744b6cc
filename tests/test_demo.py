"""The embedded demo's chain (base -> SFT -> GRPO, base -> GRPO) on a tiny budget: every stage runs, the table
and the plot are written, and overrides that name no stage are refused."""

import json

import pytest

from openr1_jax.demo import run_demo
from openr1_jax.errors import UserError

TINY_GRPO = ["max_steps=2", "batch_size=16", "num_generations=4", "logging.progress_bar=false"]


@pytest.mark.slow
def test_demo_chain_writes_the_table_and_plot(tmp_path, capsys):
    overrides = [
        "pretrain.max_steps=4",
        "pretrain.batch_size=8",
        "pretrain.model.overrides={num_hidden_layers: 2}",
        "pretrain.logging.progress_bar=false",
        "sft.max_steps=3",
        "sft.batch_size=8",
        "sft.logging.progress_bar=false",
        *(f"grpo.{o}" for o in TINY_GRPO),
        *(f"r1zero.{o}" for o in TINY_GRPO),
    ]
    rows = run_demo(str(tmp_path), overrides, num_eval=8)
    assert len(rows) == 5 and rows[0].stage.startswith("base")
    assert [r.heldout for r in rows] == ["all", "all", "all", "carry-free", "carry-free"]
    assert all(0.0 <= r.accuracy <= 1.0 and r.mean_length > 0 for r in rows)
    assert (tmp_path / "stages.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "stages.json").read_text())) == 5
    table = capsys.readouterr().out
    assert "base -> SFT -> GRPO (R1)" in table and "R1-Zero" in table
    easy = [
        json.loads(line)
        for name in ("carry_free.jsonl", "carry_free_test.jsonl")
        for line in (tmp_path / "data" / name).read_text().splitlines()
    ]
    assert easy
    for row in easy:  # no column carries: every digit pair sums below 10
        a, b = row["problem"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert all(int(x) + int(y) < 10 for x, y in zip(a.zfill(2), b.zfill(2))), row


def test_demo_override_must_name_a_stage(tmp_path):
    with pytest.raises(UserError, match="must start with a stage"):
        run_demo(str(tmp_path), ["max_steps=3"])
