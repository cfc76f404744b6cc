"""Greedy decoding on a tiny random MoE: a fixed point of the full forward, batch-independent, stops at EOS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from openr1_jax.data.embedded import TOKENIZER_DIR, load_rows
from openr1_jax.errors import UserError
from openr1_jax.evaluate.greedy import encode_prompts, generate_ids, greedy_generate, heldout_accuracy
from openr1_jax.models.params import build_model
from openr1_jax.models.presets import load_model_config

NEW = 12


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def model():
    return build_model(load_model_config("tiny-moe", {"max_position_embeddings": 128}), seed=0)


@pytest.fixture(scope="module")
def prompts():
    row = load_rows("test", 1)[0]
    # Three prompt lengths; "Hi" alone fits a shorter buffer than in a batch with a longer prompt.
    return [
        [{"role": "user", "content": "Hi"}],
        row["messages"][:1],
        [{"role": "user", "content": "What is 5 + 7? Be brief."}],
    ]


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, ids_1xT):
    return nnx.merge(graphdef, state)(ids_1xT, with_mtp=False).logits[0]


def _assert_greedy_fixed_point(model, prompt, generated, eos):
    """Every generated token is the argmax of one full forward over the sequence before it (right-padded to a
    fixed length, so one compilation serves every row; causality makes the padding irrelevant)."""
    n = len(prompt) + len(generated)
    ids = np.zeros((1, 64), np.int32)
    ids[0, :n] = prompt + generated
    logits = _full_logits(*nnx.split(model), jnp.asarray(ids))
    predicted = np.asarray(jnp.argmax(logits[len(prompt) - 1 : n - 1], axis=-1)).tolist()
    assert predicted == generated
    assert eos not in generated[:-1]
    assert len(generated) == NEW or generated[-1] == eos


def test_batched_decode_equals_each_row_alone_and_the_full_forward(model, tok, prompts):
    ids = encode_prompts(tok, prompts)
    assert len({len(p) for p in ids}) == 3
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # batch_size 2: one full batch mixing lengths, then a short final batch.
    batched = generate_ids(model, ids, NEW, [eos], pad, batch_size=2)
    alone = [generate_ids(model, [p], NEW, [eos], pad, batch_size=1)[0] for p in ids]
    assert batched == alone
    for p, g in zip(ids, batched):
        _assert_greedy_fixed_point(model, p, g, eos)
    # Deterministic, and the text is the decoded ids.
    texts = greedy_generate(model, tok, prompts, NEW, batch_size=2)
    assert texts == greedy_generate(model, tok, prompts, NEW, batch_size=2)
    assert texts == [tok.decode(g[:-1] if g[-1] == eos else g) for g in batched]


def test_rows_stop_at_eos(model, tok, prompts):
    ids = encode_prompts(tok, prompts)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    first = generate_ids(model, ids[:1], NEW, [eos], pad)[0]
    # Make EOS out-score the token the model picks at step 3 whenever that token would win: EOS now comes early.
    w = model.lm_head.kernel.value
    model_eos = build_model(model.config, seed=0)
    model_eos.lm_head.kernel.value = w.at[:, eos].set(1.5 * w[:, first[2]])
    stopped = generate_ids(model_eos, ids, NEW, [eos], pad, batch_size=2)
    assert len(stopped[0]) <= 3 and stopped[0][-1] == eos
    for p, g in zip(ids, stopped):
        _assert_greedy_fixed_point(model_eos, p, g, eos)
    text = greedy_generate(model_eos, tok, prompts[:2], NEW, batch_size=2)[0]
    assert text == tok.decode(stopped[0][:-1]) and "<|im_end|>" not in text


def test_heldout_accuracy_reports_rows_and_samples(model, tok):
    rows = load_rows("test", 3)
    result = heldout_accuracy(model, tok, rows, NEW, batch_size=2, num_samples=2)
    assert result["n"] == 3 and result["accuracy"] == 0.0  # a random model does not add
    assert [s["problem"] for s in result["samples"]] == [r["problem"] for r in rows[:2]]
    texts = greedy_generate(model, tok, [r["messages"][:1] for r in rows[:2]], NEW, batch_size=2)
    assert [s["completion"] for s in result["samples"]] == texts
    assert all(s["correct"] is False for s in result["samples"])


def test_bad_arguments_are_user_errors(model, tok, prompts):
    with pytest.raises(UserError, match="max_new_tokens"):
        greedy_generate(model, tok, prompts, 0)
    with pytest.raises(UserError, match="max_position_embeddings"):
        greedy_generate(model, tok, prompts, 500)
    assert greedy_generate(model, tok, [], NEW) == []
