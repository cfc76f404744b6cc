"""The endpoint backend against the real OpenAI-compatible server (`openr1_jax.generate.server`) over a real
Engine: greedy completions equal the in-process engine backend's, through /chat/completions and /completions;
a prompt the server refuses costs only its row; rows that failed while the server was down are generated on
the next run, each exactly once."""

import json
import re
import socket

import pytest

from openr1_jax.data.embedded import load_rows
from openr1_jax.errors import UserError
from openr1_jax.generate.config import load_generate_config
from openr1_jax.generate.run import run_generate
from openr1_jax.generate.server import start_server

NEW = 8
ROWS = 4


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    from openr1_jax.generate import Engine

    engine = Engine.from_pretrained(checkpoint_dir, max_batch_size=8, max_seq_len=64)
    handle = start_server(engine, model_name="tiny", batch_wait_ms=20)
    yield handle
    handle.close()


def _cfg(checkpoint_dir, out, *extra):
    return load_generate_config(
        "default",
        [
            "backend=openai",
            "openai.model=null",  # learnt from /v1/models
            f"engine.model={checkpoint_dir}",
            f"output_path={out}",
            f"dataset.max_examples={ROWS}",
            f"sampling.max_new_tokens={NEW}",
            "sampling.temperature=0",
            "num_generations=2",
            "engine.max_batch_size=8",
            "engine.max_seq_len=64",
            "progress=false",
            *extra,
        ],
    )


def _records(path):
    """In dataset order: the endpoint backend appends rows as they finish."""
    order = {row["id"]: i for i, row in enumerate(load_rows("test"))}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(records, key=lambda r: order.get(r["id"], r["id"]))


def test_greedy_completions_equal_the_engine_backend(checkpoint_dir, tokenizer, server, tmp_path):
    via_engine = tmp_path / "engine.jsonl"
    run_generate(_cfg(checkpoint_dir, via_engine, "backend=engine"))
    chat = tmp_path / "chat.jsonl"
    summary = run_generate(_cfg(checkpoint_dir, chat, f"openai.base_url={server.url}"))
    text = tmp_path / "completions.jsonl"
    run_generate(
        _cfg(checkpoint_dir, text, f"openai.base_url={server.url}", "openai.endpoint=completions",
             f"openai.tokenizer={checkpoint_dir}")
    )  # fmt: skip
    assert (summary["generated"], summary["failed"]) == (ROWS, 0) and summary["completion_tokens"] > 0
    expected = _records(via_engine)
    assert [r["id"] for r in expected] == [r["id"] for r in load_rows("test")[:ROWS]]
    for path in (chat, text):
        got = _records(path)
        assert [r["generations"] for r in got] == [r["generations"] for r in expected]
        assert [r["finish_reasons"] for r in got] == [r["finish_reasons"] for r in expected]
        assert [r["prompt_tokens"] for r in got] == [r["prompt_tokens"] for r in expected]
        assert [r["completion_tokens"] for r in got] == [r["completion_tokens"] for r in expected]
        assert [r["verdicts"] for r in got] == [r["verdicts"] for r in expected]


def test_a_refused_prompt_costs_only_its_row(checkpoint_dir, server, tmp_path):
    data = tmp_path / "data.jsonl"
    problems = ["What is 1 + 2?", "What is " + " + ".join(["12"] * 40) + "?", "What is 5 + 5?"]
    data.write_text("".join(json.dumps({"problem": p, "answer": "3"}) + "\n" for p in problems))
    out = tmp_path / "gen.jsonl"
    extra = [f"openai.base_url={server.url}", f"dataset.path={data}", "dataset.id_column=null"]
    summary = run_generate(_cfg(checkpoint_dir, out, *extra))
    records = _records(out)
    assert (summary["generated"], summary["failed"]) == (2, 1)
    assert sorted(r["id"] for r in records) == [0, 1, 2]
    bad = next(r for r in records if r["id"] == 1)
    assert re.search(r"HTTP 400: .*(context length|too long)", bad["error"]) and bad["generations"] == []
    assert bad["verdicts"] == [] and bad["kept"] is False


def test_rows_that_failed_while_the_server_was_down_are_retried(checkpoint_dir, server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    out = tmp_path / "gen.jsonl"
    retries = ["openai.model=tiny", "openai.max_retries=0"]
    with pytest.raises(UserError, match=f"all {ROWS} rows failed.*connection refused"):
        run_generate(_cfg(checkpoint_dir, out, f"openai.base_url={down}", *retries))
    assert all(r["error"] for r in _records(out))

    summary = run_generate(_cfg(checkpoint_dir, out, f"openai.base_url={server.url}", *retries))
    assert (summary["generated"], summary["failed"], summary["already_done"]) == (ROWS, 0, 0)
    records = _records(out)
    assert [r["id"] for r in records] == [r["id"] for r in load_rows("test")[:ROWS]]
    assert all(r["error"] is None and len(r["generations"]) == 2 for r in records)
