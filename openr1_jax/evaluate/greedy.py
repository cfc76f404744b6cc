"""Greedy decoding without a KV cache, and held-out accuracy on verifiable problems.

Simple on purpose (the real sampler with prefill + KV cache lives in `openr1_jax.generate`): every step runs
the full forward over a fixed buffer of `prompt_len + max_new_tokens` tokens inside one `jax.lax.while_loop`.
Prompts are right-padded, so every row starts at column 0 and the causal mask alone keeps the padding after a
row's cursor from ever reaching its logits: a row decodes to the same tokens alone or in any batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from openr1_jax.data.embedded.task import is_correct
from openr1_jax.errors import UserError
from openr1_jax.generate.engine import eos_ids
from openr1_jax.sharding.distributed import fetch

PROMPT_BUCKET = 8  # prompt lengths round up to this, so batches of similar prompts share one compilation


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _decode(graphdef, state, tokens_BxT, prompt_len_B, eos_ids, *, max_new_tokens: int):
    """Greedy-extend each row of `tokens_BxT` from column `prompt_len_B[b]` for up to `max_new_tokens` steps.

    Returns the buffer and each row's number of generated tokens (its EOS included, if it made one).
    """
    B, T = tokens_BxT.shape
    rows_B = jnp.arange(B)
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    def body(carry):
        step, tokens_BxT, done_B, length_B = carry
        cursor_B = prompt_len_B + step  # the column this step writes
        # Segment 1 = tokens so far, 0 = the unwritten tail (kept out of the rows' attention anyway by causality).
        segment_BxT = (positions_BxT < cursor_B[:, None]).astype(jnp.int32)
        model = nnx.merge(graphdef, state)  # a fresh module per trace: the MoE's sown statistics stay local
        logits_BxTxV = model(tokens_BxT, positions=positions_BxT, segment_ids=segment_BxT, with_mtp=False).logits
        next_B = jnp.argmax(logits_BxTxV[rows_B, cursor_B - 1].astype(jnp.float32), axis=-1).astype(jnp.int32)
        write_B = ~done_B
        tokens_BxT = tokens_BxT.at[rows_B, cursor_B].set(jnp.where(write_B, next_B, tokens_BxT[rows_B, cursor_B]))
        length_B = length_B + write_B.astype(jnp.int32)
        done_B = done_B | jnp.isin(next_B, eos_ids)
        return step + 1, tokens_BxT, done_B, length_B

    def cond(carry):
        step, _, done_B, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    init = (jnp.int32(0), tokens_BxT, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    _, tokens_BxT, _, length_B = jax.lax.while_loop(cond, body, init)
    return tokens_BxT, length_B


def encode_prompts(tokenizer, prompts: Sequence[list[dict]]) -> list[list[int]]:
    """Chat-templated prompt ids, ending with the assistant turn's header."""
    texts = [tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def generate_ids(
    model,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """The greedy continuation of each prompt, ending with its EOS if one came within `max_new_tokens`."""
    if max_new_tokens <= 0 or batch_size <= 0:
        raise UserError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be positive")
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("greedy decoding needs every prompt to hold at least one token")
    # Values sown by earlier calls (MoE statistics) must not enter the loop: sowing appends to them.
    clean = nnx.clone(model)
    nnx.pop(clean, nnx.Intermediate)
    graphdef, state = nnx.split(clean)
    eos_arr = jnp.asarray(list(eos_ids), jnp.int32)
    batch_size = min(batch_size, len(prompt_ids))
    out_ids: list[list[int]] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="greedy decode", unit="batch", leave=False):
        chunk = list(prompt_ids[start : start + batch_size])
        # Every batch has the same shape (short final batches are filled with copies of their first row).
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        prompt_T = -(-max(len(r) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
        T = prompt_T + max_new_tokens
        if model.config.max_position_embeddings < T:
            raise UserError(
                f"prompt ({prompt_T} tokens, rounded) + max_new_tokens ({max_new_tokens}) exceed the model's "
                f"max_position_embeddings ({model.config.max_position_embeddings})"
            )
        tokens = np.full((batch_size, T), pad_id, np.int32)
        for b, ids in enumerate(rows):
            tokens[b, : len(ids)] = ids
        prompt_len = np.array([len(r) for r in rows], np.int32)
        out, length = _decode(
            graphdef, state, jnp.asarray(tokens), jnp.asarray(prompt_len), eos_arr, max_new_tokens=max_new_tokens
        )
        out, length = fetch((out, length))  # with several processes, rows live on all of them
        out_ids += [out[b, prompt_len[b] : prompt_len[b] + length[b]].tolist() for b in range(len(chunk))]
    return out_ids


def greedy_generate(
    model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """The greedy completion of each chat prompt (a list of messages), cut before the first EOS.

    Special tokens other than EOS are kept in the text (e.g. `<think>`), so format checks see them.
    """
    if not prompts:
        return []
    eos = eos_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generated = generate_ids(model, encode_prompts(tokenizer, prompts), max_new_tokens, eos, pad_id, batch_size)
    return [tokenizer.decode(g[:-1] if g and g[-1] in eos else g, skip_special_tokens=False) for g in generated]


def prompt_messages(row: dict) -> list[dict]:
    """A row's conversation without its trailing assistant turn(s): what the model is asked."""
    messages = list(row.get("messages") or [{"role": "user", "content": row["problem"]}])
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise UserError(f"row '{row.get('id', '?')}' has no prompt: its messages hold only assistant turns")
    return messages


def heldout_accuracy(
    model, tokenizer, rows: Sequence[dict], max_new_tokens: int, batch_size: int = 64, num_samples: int = 4
) -> dict:
    """Exact-answer accuracy of greedy completions on `rows` (each with `messages` or `problem`, and `answer`).

    Returns {"accuracy", "n", "samples": the first `num_samples` rows' problem, answer, completion, correct}.
    """
    completions = greedy_generate(model, tokenizer, [prompt_messages(r) for r in rows], max_new_tokens, batch_size)
    correct = [is_correct(c, r["answer"]) for c, r in zip(completions, rows, strict=True)]
    samples = [
        {"problem": prompt_messages(r)[-1]["content"], "answer": r["answer"], "completion": c, "correct": ok}
        for r, c, ok in list(zip(rows, completions, correct, strict=True))[:num_samples]
    ]
    n = len(rows)
    return {"accuracy": sum(correct) / n if n else 0.0, "n": n, "samples": samples}
