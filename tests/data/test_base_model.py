"""The shipped embedded base model: small, loadable by name, and flawed the way R1's recipe needs (right without
a carry, mostly wrong with one); and the script that makes it writes a folder `load_model` reads back."""

import json

import numpy as np
import pytest

from openr1_jax import load_model
from openr1_jax.data.embedded import load_rows, task
from openr1_jax.data.embedded.base_model import (
    BASE_DIR,
    BASE_NAME,
    PLAIN_TEMPLATE,
    pretrain_base,
    resolve_model_path,
    write_plain_corpus,
)
from openr1_jax.generate import Engine, SamplingParams
from openr1_jax.models.presets import load_model_config


def test_the_base_is_a_small_hugging_face_folder_of_the_demo_model():
    assert resolve_model_path(BASE_NAME) == BASE_DIR
    assert resolve_model_path("runs/x").name == "x"
    assert (BASE_DIR / "config.json").is_file() and (BASE_DIR / "tokenizer_config.json").is_file()
    assert sum(p.stat().st_size for p in BASE_DIR.iterdir()) < 8_000_000
    config = json.loads((BASE_DIR / "config.json").read_text())
    demo = load_model_config("demo-moe")
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_nextn_predict_layers"]) == (
        demo.hidden_size,
        demo.num_hidden_layers,
        demo.num_nextn_predict_layers,
    )


def test_greedy_base_solves_the_problems_without_a_carry_and_few_with_one():
    engine = Engine.from_pretrained(BASE_NAME, max_seq_len=64)
    rows = load_rows("test", 120)
    prompts = [engine.encode(PLAIN_TEMPLATE.format(prompt=r["problem"])) for r in rows]
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=32))
    correct = np.array([task.is_correct(o.outputs[0].text, r["answer"]) for o, r in zip(outs, rows, strict=True)])
    carry = np.array([_units_carry(r) for r in rows])
    assert carry.any() and (~carry).any()
    assert correct[~carry].mean() > 0.9
    assert correct[carry].mean() < 0.25


def _units_carry(row: dict) -> bool:
    a, b = row["problem"].removeprefix("What is ").removesuffix("?").split(" + ")
    return int(a[-1]) + int(b[-1]) >= 10


def test_plain_corpus_is_prompt_completion_text_from_the_flawed_teacher(tmp_path):
    n = write_plain_corpus(tmp_path / "corpus.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(rows) == n == task.max_rows("train")
    assert rows[0]["prompt"].startswith("User: What is ") and rows[0]["prompt"].endswith("\nAssistant:")
    assert all(r["completion"].startswith("<think>\n") for r in rows)


@pytest.mark.slow
def test_the_script_writes_a_folder_load_model_reads(tmp_path):
    out = pretrain_base(tmp_path / "base", steps=2, overrides=("batch_size=2", "logging.progress_bar=false"))
    model = load_model(out)
    assert len(model.mtp) == 1 and model.config.vocab_size == load_model_config("demo-moe").vocab_size
    assert (out / "tokenizer_config.json").is_file()
