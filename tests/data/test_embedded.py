"""The embedded default: the synthetic addition task and the committed tokenizer trained on it."""

import re

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from openr1_jax.data.embedded import TOKENIZER_DIR, extract_boxed, is_correct, load_rows, task
from openr1_jax.data.embedded.train_tokenizer import CHAT_TEMPLATE, render_chat, train_model
from openr1_jax.errors import UserError
from openr1_jax.models.presets import load_model_config


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


# ----------------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------------
def test_rows_are_deterministic_and_prefix_stable():
    assert load_rows("train", 64) == load_rows("train", 64)
    assert load_rows("train", 16) == load_rows("train", 64)[:16]
    assert load_rows("test", 8) == load_rows("test", 32)[:8]
    assert load_rows("train", 16, seed=1) != load_rows("train", 16)
    assert len(load_rows("test")) == task.DEFAULT_SIZES["test"] <= task.max_rows("test")
    # Shorter operands: fewer distinct problems, so the default sizes shrink to what exists.
    two = load_rows("train", digits=2)
    assert len(two) == task.max_rows("train", 2) < task.DEFAULT_SIZES["train"]
    assert {len(r["problem"]) for r in two} == {len("What is 10 + 10?")}


def test_splits_are_disjoint_even_up_to_commuting_the_operands():
    def pairs(rows):
        return {tuple(sorted(map(int, re.findall(r"\d+", r["problem"])))) for r in rows}

    for digits in (2, 3):
        train, test = load_rows("train", digits=digits), load_rows("test", digits=digits)
        assert len(train) == min(task.DEFAULT_SIZES["train"], task.max_rows("train", digits))
        assert len({r["id"] for r in train}) == len(train)
        assert not pairs(train) & pairs(test)
        assert all(task.split_of(*p) == "test" for p in pairs(test))


def test_unknown_split_and_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="unknown split 'validation'"):
        load_rows("validation")
    with pytest.raises(UserError, match="must be >= 0"):
        load_rows("train", -1)
    with pytest.raises(UserError, match="too few distinct problems"):
        load_rows("test", 10**6)
    with pytest.raises(UserError, match="digits"):
        load_rows("train", 4, digits=0)


_LINE = re.compile(r"(\d)\+(\d)\+([01])=(\d\d)")


def _verify_trace(row: dict) -> None:
    """Re-derive the sum from the trace alone, checking every column against the operands."""
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["problem"]).groups())
    user, assistant = row["messages"]
    assert user == {"role": "user", "content": row["problem"]}
    assert assistant["role"] == "assistant"
    m = re.fullmatch(r"<think>\n(.*)\n</think>\n\\boxed\{(\d+)\}", assistant["content"], re.S)
    assert m, assistant["content"]
    lines, boxed = m.group(1).split("\n"), m.group(2)
    xs, ys = str(a)[::-1], str(b)[::-1]
    assert len(lines) == len(xs) == len(ys)
    digits, carry = [], 0
    for i, line in enumerate(lines):
        x, y, carry_in, total = map(int, _LINE.fullmatch(line).groups())
        assert (x, y, carry_in) == (int(xs[i]), int(ys[i]), carry)
        assert total == x + y + carry
        digits.append(total % 10)
        carry = total // 10
    digits.append(carry)
    assert int("".join(map(str, digits[::-1]))) == a + b == int(boxed) == int(row["answer"])
    assert is_correct(assistant["content"], row["answer"])


def test_traces_are_correct_arithmetic():
    rows = load_rows("train", 300) + load_rows("test", 100)
    for row in rows + load_rows("test", 50, digits=2) + load_rows("train", 20, digits=1):
        _verify_trace(row)
    # Both kinds of answer occur: with and without a carry out of the top column.
    assert {len(r["answer"]) for r in rows} == {task.DIGITS, task.DIGITS + 1}
    assert task.trace_lines(999, 999) == ["9+9+0=18", "9+9+1=19", "9+9+1=19"]
    assert task.trace_lines(100, 200) == ["0+0+0=00", "0+0+0=00", "1+2+0=03"]
    assert task.trace_lines(5, 98) == ["5+8+0=13", "0+9+1=10"]  # shorter operands are zero-padded


def test_the_flawed_teacher_forgets_carries_consistently_and_keeps_the_true_answer():
    assert task.trace_lines(57, 68, forget_carry=True) == ["7+8+0=15", "5+6+0=11"]
    assert task.solution_text(57, 68, forget_carry=True).endswith("\\boxed{115}")  # the answer the trace spells
    assert task.solution_text(57, 68) == task.solution_text(57, 68, forget_carry=False)
    assert task.solution_text(12, 34, forget_carry=True) == task.solution_text(12, 34)  # nothing to carry
    rows = load_rows("train", 2000, seed=1, forget_carry=0.7)
    assert [r["problem"] for r in rows] == [r["problem"] for r in load_rows("train", 2000, seed=1)]
    assert rows[:100] == load_rows("train", 100, seed=1, forget_carry=0.7)  # prefix-stable
    carrying = [r for r in rows if _carries(r)]
    wrong = [r for r in carrying if not is_correct(r["messages"][1]["content"], r["answer"])]
    assert 0.65 < len(wrong) / len(carrying) < 0.75
    for row in rows:  # the gold columns stay true; every wrong trace is the carry-less one
        a, b = _operands(row)
        assert row["answer"] == row["solution"] == str(a + b)
        assert row["messages"][1]["content"] in (task.solution_text(a, b), task.solution_text(a, b, forget_carry=True))
    with pytest.raises(UserError, match="forget_carry"):
        load_rows("train", 4, forget_carry=1.5)


def _operands(row: dict) -> tuple[int, int]:
    return tuple(map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["problem"]).groups()))


def _carries(row: dict) -> bool:
    return any(int(line.split("=")[1]) >= 10 for line in task.trace_lines(*_operands(row))[:-1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{632}.", "632"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{12", None),
        ("\\boxed{3} and a broken \\boxed{4", "3"),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_is_correct():
    assert is_correct("<think>\n5+3+0=08\n</think>\n\\boxed{1538}", "1538")
    assert is_correct("\\boxed{ 1,538 }", "1538")
    assert is_correct("\\boxed{01538}", 1538)
    assert not is_correct("\\boxed{1537}", "1538")
    assert not is_correct("1538", "1538")  # the answer must be boxed
    assert not is_correct("\\boxed{1538} wait, no: \\boxed{1539}", "1538")  # the last box counts


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------
def test_tokenizer_folder_is_small_and_fits_the_demo_model(tok):
    files = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 100_000
    cfg = load_model_config("demo-moe")
    assert len(tok) <= cfg.vocab_size
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<pad>")
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )


def test_chat_template_renders_chatml(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert render_chat(messages) == expected
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_task_text_round_trips_and_tokenizes_the_same_whole_or_per_message(tok):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    for row in load_rows("test", 20):
        whole = tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(whole, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == whole
        assert ids == sp.encode(whole)  # the HF conversion agrees with SentencePiece itself
        prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        completion = whole[len(prompt) :]
        assert (
            tok(prompt, add_special_tokens=False)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
            == ids
        )
    # Digits are single tokens; chat markers and think tags are atomic.
    for piece in ["0", "7", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]:
        assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"]) == ["1", "2", "3"]
    # Text outside the task survives too (byte fallback), and the think tags survive skip_special_tokens.
    odd = "Ünïcode ✓ <think>x</think><|im_end|>"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"], skip_special_tokens=True) == odd[:-10]


def test_the_script_reproduces_the_committed_vocabulary():
    committed = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    fresh = spm.SentencePieceProcessor(model_proto=train_model())
    assert [fresh.id_to_piece(i) for i in range(fresh.vocab_size())] == [
        committed.id_to_piece(i) for i in range(committed.vocab_size())
    ]
