"""Chat templating and tokenization with a loss mask on the assistant (or completion) tokens.

Assistant spans are found on the rendered text, not guessed from token ids: rendering the conversation up to
turn i with a generation prompt gives the text before the assistant's answer, rendering through turn i gives
the text after it, and the difference is exactly what the model must produce, end-of-turn marker included.
The full text is then tokenized once (offsets map tokens back to characters), so ids equal those of
`apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from typing import Any

import numpy as np

from openr1_jax.data.config import DataConfig
from openr1_jax.errors import UserError

Span = tuple[int, int]  # [start, end) character offsets of trained text

_SPECIAL_PREFIX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_tokenizer(cfg: DataConfig):
    """Loads the tokenizer of `cfg` (a folder, a hub name or "embedded") and applies its overrides."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer
    if name == "embedded":
        from openr1_jax.data import embedded  # lazy: another module owns the bundled tokenizer

        name = str(embedded.TOKENIZER_DIR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # missing folder, offline hub, broken files: one message for the user
        raise UserError(f"cannot load tokenizer {name!r} (data.tokenizer): {e}") from e
    if cfg.chat_template is not None:
        tokenizer.chat_template = read_template(cfg.chat_template)
    if cfg.eos_token is not None:
        if cfg.eos_token not in tokenizer.get_vocab():
            raise UserError(f"data.eos_token {cfg.eos_token!r} is not a token of tokenizer {name!r}.")
        tokenizer.eos_token = cfg.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {name!r} has no chat template; set data.chat_template to a Jinja template.")
    return tokenizer


def pad_id(tokenizer) -> int:
    """Id used for padding (masked everywhere, so any valid id works): pad, else EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def tokenize_example(row: dict[str, Any], tokenizer, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Row with canonical keys (see sources.py) -> (input_ids int32 [n], loss_mask int32 [n])."""
    if "messages" in row:
        messages = _with_system(_as_messages(row["messages"], "messages"), cfg.system_prompt)
        text, spans = _assistant_spans(tokenizer, messages)
        return _tokenize(tokenizer, text, spans)
    if "prompt" not in row or "completion" not in row:
        raise UserError(f"an example needs 'messages' or 'prompt' and 'completion'; it has {sorted(row)}.")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        # Plain text, as TRL's standard prompt-completion format: no template, EOS closes the completion.
        eos = tokenizer.eos_token or ""
        if eos and not completion.endswith(eos):
            completion += eos
        return _tokenize(tokenizer, prompt + completion, [(len(prompt), len(prompt) + len(completion))])
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt, "prompt")
    completion_msgs = (
        [{"role": "assistant", "content": completion}]
        if isinstance(completion, str)
        else _as_messages(completion, "completion")
    )
    prompt_msgs = _with_system(prompt_msgs, cfg.system_prompt)
    before = _render(tokenizer, prompt_msgs, add_generation_prompt=True)
    full = _render(tokenizer, prompt_msgs + completion_msgs)
    if not full.startswith(before):
        raise UserError(_PREFIX_ERROR.format(what="the prompt"))
    return _tokenize(tokenizer, full, [(len(before), len(full.rstrip()))])


# ----------------------------------------------------------------------------------------------------------
# Templating
# ----------------------------------------------------------------------------------------------------------
_PREFIX_ERROR = (
    "the chat template renders {what} differently once later turns follow (e.g. it drops past reasoning), so "
    "the trained span cannot be located; set data.chat_template to a template that renders turns unchanged."
)


def read_template(value: str) -> str:
    """A Jinja template given inline, or the contents of the file it names (a template always holds a brace)."""
    path = os.path.expanduser(value)
    if "{" not in value and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


def _as_messages(value: Any, column: str) -> list[dict[str, Any]]:
    ok = isinstance(value, list | tuple) and all(isinstance(m, dict) and "role" in m for m in value)
    if not ok or not value:
        raise UserError(
            f"column {column!r} must hold a non-empty list of {{role, content}} messages, got {value!r:.80}."
        )
    return list(value)


def _with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's TemplateError or raise_exception() inside the template
        roles = [m["role"] for m in messages]
        raise UserError(f"the chat template failed on a conversation with roles {roles}: {e}") from e


def _assistant_spans(tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[Span]]:
    full = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise UserError(_PREFIX_ERROR.format(what=f"turn {i}"))
        # Whitespace after the end-of-turn marker separates turns; the model never has to produce it.
        spans.append((len(before), len(through.rstrip())))
    return full, spans


# ----------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------
def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before text by default (BOS), to add when the template did not render them."""
    try:
        return _SPECIAL_PREFIX[tokenizer]
    except (KeyError, TypeError):
        pass
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix = list(with_special[:start])
            break
    with contextlib.suppress(TypeError):  # not weak-referenceable: recompute next time
        _SPECIAL_PREFIX[tokenizer] = prefix
    return prefix


def _tokenize(tokenizer, text: str, spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64).reshape(-1)
        mask = np.zeros(len(ids), bool)
        for a, b in spans:  # a token is trained iff it starts inside a trained span
            mask |= (starts >= a) & (starts < b)
    else:  # no offsets: tokenize piece by piece at span boundaries
        cuts = sorted({0, len(text), *(x for span in spans for x in span)})
        id_parts, mask_parts = [], []
        for a, b in itertools.pairwise(cuts):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            trained = any(s <= a and b <= e for s, e in spans)
            id_parts.append(np.asarray(piece, np.int32))
            mask_parts.append(np.full(len(piece), trained))
        ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
        mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, bool)
    bos = tokenizer.bos_token
    prefix = [] if bos and text.startswith(bos) else _special_prefix(tokenizer)
    if prefix:
        ids = np.concatenate([np.asarray(prefix, np.int32), ids])
        mask = np.concatenate([np.zeros(len(prefix), bool), mask])
    return ids.astype(np.int32), mask.astype(np.int32)
