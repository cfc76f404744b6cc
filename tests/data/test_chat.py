"""Chat templating and loss masks, on real tokenizers trained here in a few milliseconds (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

from openr1_jax.data.chat import load_tokenizer, pad_id, tokenize_example
from openr1_jax.data.config import DataConfig
from openr1_jax.errors import UserError

# Qwen2-Instruct's chat template, verbatim.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: the template renders BOS itself.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "What is 12 + 30? The answer is 42.",
    "You are a helpful assistant. Think step by step.",
    "<think> 2+3=5, write 5 </think> \\boxed{5}",
    "hello world, how are you today?",
]


def build_tokenizer(folder: str, *, template: str | None = QWEN2_TEMPLATE, bos: bool = False) -> str:
    """Trains a byte-level BPE (Qwen2-like special tokens) and saves it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if bos:  # a tokenizer that adds BOS by default, like Llama's
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<s>" if bos else None
    )
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("qwen_tok")))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think> 2+3=5 </think> \\boxed{5}"},
    {"role": "user", "content": "And 12 + 30?"},
    {"role": "assistant", "content": "The answer is 42."},
]


def test_loss_masking_only_assistant_turns_with_end_of_turn(qwen_dir):
    cfg = DataConfig(tokenizer=qwen_dir)
    tok = load_tokenizer(cfg)
    ids, mask = tokenize_example({"messages": CONVERSATION}, tok, cfg)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    # Same ids as transformers' own templating + tokenization.
    expected = tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    np.testing.assert_array_equal(ids, expected)
    runs = _runs(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [
        "<think> 2+3=5 </think> \\boxed{5}<|im_end|>",
        "The answer is 42.<|im_end|>",
    ]
    # Everything else (system, user turns, role headers, separators) is untrained.
    untrained = tok.decode(ids[mask == 0])
    assert "What is 2+3?" in untrained and "assistant\n" in untrained and "42" not in untrained


def test_system_prompt_prepended_only_when_missing(qwen_dir):
    cfg = DataConfig(tokenizer=qwen_dir, system_prompt="Think step by step.")
    tok = load_tokenizer(cfg)
    ids, mask = tokenize_example({"messages": CONVERSATION[:2]}, tok, cfg)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nThink step by step.<|im_end|>") and "helpful" not in text
    own_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:2]]
    text = tok.decode(tokenize_example({"messages": own_system}, tok, cfg)[0])
    assert "Be brief." in text and "Think step by step." not in text
    assert tok.decode(ids[mask == 1]) == CONVERSATION[1]["content"] + "<|im_end|>"


def test_prompt_completion_plain_text_trains_completion_and_eos(qwen_dir):
    cfg = DataConfig(tokenizer=qwen_dir)
    tok = load_tokenizer(cfg)
    ids, mask = tokenize_example({"prompt": "What is 12 + 30?", "completion": " The answer is 42."}, tok, cfg)
    assert tok.decode(ids) == "What is 12 + 30? The answer is 42.<|im_end|>"
    assert tok.decode(ids[mask == 1]) == " The answer is 42.<|im_end|>"
    assert _runs(mask) == [(_runs(mask)[0][0], len(ids))]  # one run, to the end


def test_prompt_completion_conversational(qwen_dir):
    cfg = DataConfig(tokenizer=qwen_dir)
    tok = load_tokenizer(cfg)
    row = {"prompt": [{"role": "user", "content": "What is 2+3?"}], "completion": "\\boxed{5}"}
    ids, mask = tokenize_example(row, tok, cfg)
    assert tok.decode(ids[mask == 1]) == "\\boxed{5}<|im_end|>"
    assert tok.decode(ids).endswith("<|im_start|>assistant\n\\boxed{5}<|im_end|>\n")
    as_messages = {"messages": [*row["prompt"], {"role": "assistant", "content": "\\boxed{5}"}]}
    ids2, mask2 = tokenize_example(as_messages, tok, cfg)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(mask, mask2)


def test_bos_exactly_once(tmp_path):
    in_template = build_tokenizer(str(tmp_path / "a"), template=BOS_TEMPLATE, bos=True)
    not_in_template = build_tokenizer(str(tmp_path / "b"), template=QWEN2_TEMPLATE, bos=True)
    for folder in (in_template, not_in_template):
        cfg = DataConfig(tokenizer=folder)
        tok = load_tokenizer(cfg)
        ids, mask = tokenize_example({"messages": CONVERSATION[:2]}, tok, cfg)
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1, folder
        assert mask[0] == 0
        assert tok.decode(ids[mask == 1]) == CONVERSATION[1]["content"] + "<|im_end|>"


def test_slow_tokenizer_masks_by_segments(tmp_path):
    """A SentencePiece tokenizer without offsets (transformers' Python backend) takes the piecewise path."""
    import sentencepiece as spm
    from transformers.models.bert_generation import BertGenerationTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        hard_vocab_limit=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        minloglevel=2,
    )
    tok = BertGenerationTokenizer(vocab_file=str(tmp_path / "sp.model"), eos_token="<|im_end|>", pad_token="<unk>")
    tok.chat_template = QWEN2_TEMPLATE
    assert not tok.is_fast
    cfg = DataConfig(tokenizer="unused")
    ids, mask = tokenize_example({"messages": CONVERSATION}, tok, cfg)
    assert [tok.decode(ids[a:b]) for a, b in _runs(mask)] == [
        m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"
    ]


def test_tokenizer_without_chat_template_is_a_user_error(tmp_path):
    folder = build_tokenizer(str(tmp_path / "plain"), template=None)
    with pytest.raises(UserError, match="no chat template"):
        load_tokenizer(DataConfig(tokenizer=folder))
    template_file = tmp_path / "template.jinja"
    template_file.write_text(QWEN2_TEMPLATE)
    for template in (QWEN2_TEMPLATE, str(template_file)):
        tok = load_tokenizer(DataConfig(tokenizer=folder, chat_template=template))
        assert tok.chat_template == QWEN2_TEMPLATE


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nowhere")))


def test_eos_override(qwen_dir):
    tok = load_tokenizer(DataConfig(tokenizer=qwen_dir, eos_token="<|endoftext|>"))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert pad_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(UserError, match=r"data\.eos_token"):
        load_tokenizer(DataConfig(tokenizer=qwen_dir, eos_token="<nope>"))


def test_template_that_rewrites_history_is_a_user_error(qwen_dir):
    # Like DeepSeek-R1's template: past assistant turns lose their reasoning once a later turn exists.
    strip_history = (
        "{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    cfg = DataConfig(tokenizer=qwen_dir, chat_template=strip_history)
    tok = load_tokenizer(cfg)
    with pytest.raises(UserError, match="renders turn 1 differently"):
        tokenize_example({"messages": CONVERSATION}, tok, cfg)


def test_bad_rows_are_user_errors(qwen_dir):
    cfg = DataConfig(tokenizer=qwen_dir)
    tok = load_tokenizer(cfg)
    with pytest.raises(UserError, match="'messages' must hold"):
        tokenize_example({"messages": "hello"}, tok, cfg)
    with pytest.raises(UserError, match="needs 'messages'"):
        tokenize_example({"text": "hello"}, tok, cfg)
