"""The generate job on the real Engine over a tiny random MoE: the default recipe end to end, a prompt too long
for the context, and a resume after SIGKILL that ends with every row exactly once and the same completions as an
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from openr1_jax.data.embedded import load_rows
from openr1_jax.generate.config import load_generate_config
from openr1_jax.generate.run import run_generate

NEW = 8


def _overrides(model_dir, out, *extra):
    return [
        f"engine.model={model_dir}",
        f"output_path={out}",
        f"sampling.max_new_tokens={NEW}",
        "engine.max_batch_size=8",
        "engine.max_seq_len=64",
        "progress=false",
        *extra,
    ]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_recipe_end_to_end_then_resume_is_a_no_op(checkpoint_dir, tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    cfg = load_generate_config("default", _overrides(checkpoint_dir, out, "dataset.max_examples=6", "batch_size=4"))
    summary = run_generate(cfg)
    records = _records(out)
    rows = load_rows("test")[:6]
    assert [r["id"] for r in records] == [r["id"] for r in rows]
    assert (summary["generated"], summary["failed"], summary["already_done"]) == (6, 0, 0)
    assert summary["kept"] == sum(r["kept"] for r in records) and summary["completion_tokens"] > 0
    for record, row in zip(records, rows):
        assert list(record) == [
            "id", "problem", "answer", "solution", "messages", "prompt", "generations", "finish_reasons",
            "prompt_tokens", "completion_tokens", "verdicts", "pass_rate", "kept", "error",
        ]  # fmt: skip
        assert (record["problem"], record["answer"], record["prompt"]) == (
            row["problem"],
            row["answer"],
            row["problem"],
        )
        chat = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        assert record["prompt_tokens"] == len(tokenizer(chat, add_special_tokens=False)["input_ids"])
        assert len(record["generations"]) == len(record["finish_reasons"]) == len(record["completion_tokens"]) == 4
        for reason, count in zip(record["finish_reasons"], record["completion_tokens"]):
            assert reason in ("stop", "length") and 1 <= count <= NEW and (reason == "stop" or count == NEW)
        assert len(record["verdicts"]) == 4 and record["error"] is None
        assert record["pass_rate"] == sum(record["verdicts"]) / 4
    before = out.read_bytes()
    again = run_generate(cfg)
    assert (again["generated"], again["already_done"]) == (0, 6) and out.read_bytes() == before


def test_a_prompt_too_long_is_its_rows_error_only(checkpoint_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    problems = ["What is 1 + 2?", "What is " + " + ".join(["12"] * 40) + "?", "What is 5 + 5?"]
    data.write_text("".join(json.dumps({"problem": p, "answer": "x"}) + "\n" for p in problems))
    out = tmp_path / "gen.jsonl"
    extra = [f"dataset.path={data}", "dataset.id_column=null", "num_generations=2", "filters.math_verify=false"]
    summary = run_generate(load_generate_config("default", _overrides(checkpoint_dir, out, *extra)))
    records = _records(out)
    assert [r["id"] for r in records] == [0, 1, 2]
    assert (summary["generated"], summary["failed"]) == (2, 1)
    bad = records[1]
    assert bad["error"].startswith("prompt too long: ") and f"+ max_new_tokens {NEW} > max_seq_len 64" in bad["error"]
    assert bad["generations"] == [] and bad["prompt_tokens"] > 64 - NEW
    assert summary["first_error"] == bad["error"]
    assert all(len(r["generations"]) == 2 and r["error"] is None for r in (records[0], records[2]))


_CHILD = (
    "import sys\n"
    "from openr1_jax.generate.config import load_generate_config\n"
    "from openr1_jax.generate.run import run_generate\n"
    "run_generate(load_generate_config('default', sys.argv[1:]))\n"
)


def _complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_resume_after_sigkill_has_no_duplicate_and_no_missing_row(checkpoint_dir, tmp_path):
    rows = 8
    extra = [f"dataset.max_examples={rows}", "batch_size=1", "num_generations=2", "filters.math_verify=false"]
    killed = tmp_path / "killed.jsonl"
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - the child writes to it until killed
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *_overrides(checkpoint_dir, killed, *extra)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.monotonic() + 240
    while _complete_lines(killed) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    log.close()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-2000:]
    written = _complete_lines(killed)
    assert 2 <= written < rows, "the job finished before it could be killed"
    with open(killed, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"id": "add-1-2", "problem": "What is')

    summary = run_generate(load_generate_config("default", _overrides(checkpoint_dir, killed, *extra)))
    assert (summary["already_done"], summary["generated"]) == (written, rows - written)
    resumed = _records(killed)
    assert [r["id"] for r in resumed] == [r["id"] for r in load_rows("test")[:rows]]

    whole = tmp_path / "whole.jsonl"
    run_generate(load_generate_config("default", _overrides(checkpoint_dir, whole, *extra)))
    assert resumed == _records(whole)  # per-row seeds: the same completions as an uninterrupted run
