"""The embedded demo's chain (base -> SFT -> GRPO, base -> GRPO) on a tiny budget: every stage runs, the table
and the plot are written, and overrides that name no stage are refused."""

import json

import pytest

from openr1_jax.data.embedded import is_correct
from openr1_jax.demo import run_demo
from openr1_jax.errors import UserError

TINY_GRPO = ["max_steps=2", "batch_size=16", "num_generations=4", "logging.progress_bar=false"]


@pytest.mark.slow
def test_demo_chain_writes_the_table_and_plot(tmp_path, capsys):
    overrides = [
        "sft.max_steps=3",
        "sft.batch_size=8",
        "sft.logging.progress_bar=false",
        *(f"grpo.{o}" for o in TINY_GRPO),
        *(f"r1zero.{o}" for o in TINY_GRPO),
    ]
    rows = run_demo(str(tmp_path), overrides, num_eval=8)
    assert [r.stage for r in rows] == [
        "base (plain prompt)",
        "base -> SFT cold start",
        "base -> SFT -> GRPO (R1)",
        "base -> GRPO (R1-Zero)",
    ]
    assert all(0.0 <= r.accuracy <= 1.0 and r.mean_length > 0 for r in rows)
    assert (tmp_path / "stages.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "stages.json").read_text())) == 4
    table = capsys.readouterr().out
    assert "base -> SFT -> GRPO (R1)" in table and "R1-Zero" in table
    # The cold start is chat-formatted, from the pretraining's flawed teacher: some traces forget their carry.
    cold = [json.loads(line) for line in (tmp_path / "data" / "cold_start.jsonl").read_text().splitlines()]
    assert cold and all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in cold)
    wrong = [row for row in cold if not is_correct(row["messages"][1]["content"], _true_sum(row))]
    assert 0 < len(wrong) < len(cold)


def _true_sum(row: dict) -> str:
    a, b = row["messages"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
    return str(int(a) + int(b))


def test_demo_override_must_name_a_stage(tmp_path):
    with pytest.raises(UserError, match="must start with a stage"):
        run_demo(str(tmp_path), ["max_steps=3"])
