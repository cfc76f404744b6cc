"""The engine against the model itself: cached decoding equals full forward passes, for MLA and dense models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from openr1_jax.errors import UserError
from openr1_jax.generate import Engine, SamplingParams
from openr1_jax.generate import engine as engine_module
from openr1_jax.generate.engine import _decode, _without_intermediates
from openr1_jax.models import kv_cache

PROMPTS = [[5, 17, 300, 42, 9, 77, 120], [8], [400, 1, 2, 3], [33, 44, 55, 66, 77, 88, 99, 111, 222, 333, 444]]


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _call(graphdef, state, *args, method):
    """`model.<method>(*args)` compiled (eager MoE layers dispatch op by op and are slow)."""
    model = nnx.merge(graphdef, state)
    if method == "forward":
        return model(*args, with_mtp=False).logits
    if method == "prefill":
        ids, lengths, cache_len = args[0], args[1], args[2].shape[0]
        h, caches = model.prefill(ids, lengths, model.init_cache(ids.shape[0], cache_len))
        return model.head(h), caches
    h, caches = model.decode(*args)
    return model.head(h), caches


def call(model, method, *args):
    return _call(*nnx.split(_without_intermediates(model)), *args, method=method)


def forward_logits(model, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits [T, V] of one sequence (float32)."""
    return np.asarray(call(model, "forward", jnp.asarray([ids]))[0], np.float32)


def assert_greedy(model, prompt: list[int], generated: list[int]) -> None:
    """Every generated token is the argmax of the full forward pass at its position (ties within 1e-5 allowed)."""
    logits = forward_logits(model, prompt + generated)
    for i, token in enumerate(generated):
        row = logits[len(prompt) - 1 + i]
        assert token == int(row.argmax()) or row.max() - row[token] < 1e-5, (i, token, int(row.argmax()))


@pytest.mark.parametrize("which", ["mla_model", "dense_model"])
def test_greedy_cached_decode_equals_full_forward_argmax(request, which, tokenizer):
    model = request.getfixturevalue(which)
    # 2 slots for 4 prompts of different lengths: a ragged batch, refilled as rows finish (continuous batching).
    engine = Engine(model, tokenizer, max_batch_size=2, chunk_size=4)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10, logprobs=True))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        (completion,) = out.outputs
        assert out.prompt_token_ids == prompt
        assert 1 <= len(completion.token_ids) <= 10
        assert_greedy(model, prompt, completion.token_ids)


def test_absorbed_latent_decode_equals_expanded_forward(mla_model):
    """MLA decode through the latent-only cache (absorbed W_UK, W_UV) gives the logits of the ordinary forward."""
    model = mla_model
    ids = jax.random.randint(jax.random.key(3), (3, 14), 0, model.config.vocab_size)
    full = call(model, "forward", ids)
    P, B = 6, ids.shape[0]
    logits, caches = call(model, "prefill", ids[:, :P], jnp.full((B,), P), jnp.zeros(16))
    steps = [logits[:, P - 1]]
    for t in range(P, ids.shape[1]):
        logits, caches = call(model, "decode", ids[:, t : t + 1], jnp.full((B,), t), caches)
        steps.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, P - 1 :], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["mla_model", "dense_model"])
def test_decode_across_the_cache_prefixes_equals_the_forward(request, which, tokenizer, monkeypatch):
    """Each decode chunk attends over the shortest cache prefix (64, 96, 128, 192, ...) that holds its rows' next
    positions: rows of different lengths, refilled on the way, decoded through chunks that cross several prefixes
    give the forward's greedy tokens and log-probs, and no chunk reads past what its rows need."""
    model = request.getfixturevalue(which)
    prefixes = []
    monkeypatch.setattr(engine_module, "_decode", functools.partial(_recording_decode, prefixes))
    prompts = [np.random.default_rng(n).integers(0, 512, n).tolist() for n in (60, 45, 20)]
    engine = Engine(model, tokenizer, max_batch_size=2, chunk_size=16)
    params = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True, logprobs=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        (completion,) = out.outputs
        assert len(completion.token_ids) == 100
        assert_greedy(model, prompt, completion.token_ids)
        logp = jax.nn.log_softmax(forward_logits(model, prompt + completion.token_ids), axis=-1)
        want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion.token_ids)]
        np.testing.assert_allclose(completion.logprobs, want, atol=1e-4)
    # The cache holds 256 positions (60 + 100 rounded up); the longest row never needs more than 159.
    assert {96, 128, 192} <= set(prefixes) and max(prefixes) == 192, prefixes


def test_a_prefix_too_short_for_the_chunk_ends_it_early(mla_model, tokenizer, monkeypatch):
    """The host picks each chunk's prefix; should it ever pick one too short, the chunk stops before any row writes
    past it (and the next chunk goes on), so generation stays exact instead of overwriting the cache's end."""
    prefixes = []
    monkeypatch.setattr(engine_module, "_decode", functools.partial(_recording_decode, prefixes))
    shortest = kv_cache.shortest_prefix
    monkeypatch.setattr(kv_cache, "shortest_prefix", lambda needed, length: shortest(max(needed - 14, 1), length))
    prompt = np.random.default_rng(1).integers(0, 512, 60).tolist()
    engine = Engine(mla_model, tokenizer, max_batch_size=1, chunk_size=16)
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 60
    assert_greedy(mla_model, prompt, out.outputs[0].token_ids)
    assert 64 in prefixes  # a chunk that needed 76 positions ran with 64 and stopped at its end


@pytest.mark.parametrize("unroll", [2, 3])
def test_an_unrolled_decode_loop_runs_the_same_steps(mla_model, tokenizer, monkeypatch, unroll):
    """`_decode(unroll=u)` (how `openr1-jax plan` tells one decode step's cost from the chunk's one-off work) runs
    the steps of the plain loop: rows of different lengths and budgets, slots refilled, sampled tokens, and
    chunks whose prefix is too short for them give the same tokens and log-probs."""
    shortest = kv_cache.shortest_prefix
    monkeypatch.setattr(kv_cache, "shortest_prefix", lambda needed, length: shortest(max(needed - 5, 1), length))
    prompts = [np.random.default_rng(n).integers(0, 512, n).tolist() for n in (60, 9, 33)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=m, seed=3, n=2, logprobs=True) for m in (31, 12, 40)]

    def generations():
        engine = Engine(mla_model, tokenizer, max_batch_size=4, chunk_size=8)
        return [(c.token_ids, c.logprobs) for out in engine.generate(prompts, params) for c in out.outputs]

    plain = generations()
    monkeypatch.setattr(engine_module, "_decode", functools.partial(_decode, unroll=unroll))
    assert generations() == plain


def _recording_decode(prefixes, *args, prefix, **kwargs):
    prefixes.append(prefix)
    return _decode(*args, prefix=prefix, **kwargs)


@pytest.mark.parametrize("which", ["mla_model", "dense_model"])
def test_decode_reads_its_cache_in_either_layout(request, which, tokenizer, monkeypatch):
    """`decode` given the storage layout or the decode-loop layout (`kv_cache.decode_layout`) computes the same
    logits and returns the cache in the layout it was given; the engine holds the decode layout in its loop."""
    model = request.getfixturevalue(which)
    ids = jax.random.randint(jax.random.key(5), (2, 6), 0, model.config.vocab_size)
    lengths = jnp.asarray([4, 6])
    _, caches = call(model, "prefill", ids, lengths, jnp.zeros(16))
    nxt = ids[:, :1]
    stored_logits, stored = call(model, "decode", nxt, lengths, caches)
    held_caches = tuple(kv_cache.decode_layout(c) for c in caches)
    held_logits, held = call(model, "decode", nxt, lengths, held_caches)
    np.testing.assert_allclose(held_logits, stored_logits, atol=1e-6)
    assert [type(c) for c in stored] == [type(c) for c in caches]
    assert [type(c) for c in held] == [type(c) for c in held_caches]
    for a, b in zip(stored, held, strict=True):
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), a, kv_cache.storage_layout(b))

    layouts = []
    decode = type(model).decode
    monkeypatch.setattr(
        type(model), "decode", lambda self, i, s, c: layouts.append(type(c[0])) or decode(self, i, s, c)
    )
    engine = Engine(model, tokenizer, max_batch_size=2)
    state = engine_module._empty_state(
        engine.graph, engine.params, engine.buffers, slots=2, cache_len=16, max_new=4, num_stop=1
    )
    # A fresh trace of the loop (a compiled one would not call the spy).
    jax.make_jaxpr(functools.partial(_decode.__wrapped__, engine.graph, steps=2, prefix=16))(
        engine.params, engine.buffers, state
    )
    assert layouts == [type(held_caches[0])]


def test_ragged_rows_decode_at_their_own_positions(mla_model):
    """Rows of different prompt lengths in one batch: each row's logits equal its own unpadded forward."""
    model = mla_model
    lengths = jnp.asarray([3, 7])
    ids = jax.random.randint(jax.random.key(4), (2, 7), 0, model.config.vocab_size)
    prefill_logits, caches = call(model, "prefill", ids, lengths, jnp.zeros(16))
    nxt = jnp.asarray([[11], [12]])
    decode_logits, _ = call(model, "decode", nxt, lengths, caches)
    for b in range(2):
        seq = [*ids[b, : int(lengths[b])].tolist(), int(nxt[b, 0])]
        want = forward_logits(model, seq)
        np.testing.assert_allclose(decode_logits[b, 0], want[-1], atol=1e-5)
        np.testing.assert_allclose(prefill_logits[b, lengths[b] - 1], want[-2], atol=1e-5)


def test_logprobs_equal_forward_logprobs(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer, max_batch_size=4)
    outs = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=8, seed=7, n=2))
    for prompt, out in zip(PROMPTS, outs, strict=False):
        for completion in out.outputs:
            logp = jax.nn.log_softmax(forward_logits(mla_model, prompt + completion.token_ids), axis=-1)
            want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion.token_ids)]
            np.testing.assert_allclose(completion.logprobs, want, atol=1e-5)


def test_same_seed_same_output_and_n_samples_differ(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer, max_batch_size=8)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, n=3, seed=11)
    first = engine.generate(PROMPTS[:2], params)
    again = engine.generate(PROMPTS[:2], params)
    alone = engine.generate(PROMPTS[1:2], params)  # a request's output does not depend on its batch mates
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in again]
    assert [c.token_ids for c in alone[0].outputs] == [c.token_ids for c in first[1].outputs]
    samples = [c.token_ids for c in first[0].outputs]
    assert len({tuple(s) for s in samples}) == 3  # n samples of one prompt draw independently
    other = engine.generate(PROMPTS[:1], params.replace(seed=12))
    assert [c.token_ids for c in other[0].outputs] != samples


def test_greedy_samples_of_one_prompt_are_identical(mla_model, tokenizer):
    out = Engine(mla_model, tokenizer).generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=6, n=3))
    assert len({tuple(c.token_ids) for c in out[0].outputs}) == 1
    assert [c.index for c in out[0].outputs] == [0, 1, 2]


def test_stop_token_stop_string_and_length(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer, chunk_size=3)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    (free,) = engine.generate(PROMPTS[:1], greedy)
    tokens = free.outputs[0].token_ids
    assert free.outputs[0].finish_reason == "length" and len(tokens) == 12

    # A stop token: generation ends on it, the token is returned, the text stops before it.
    (by_id,) = engine.generate(PROMPTS[:1], greedy.replace(stop_token_ids=(tokens[4],)))
    cut = tokens.index(tokens[4]) + 1
    assert by_id.outputs[0].token_ids == tokens[:cut]
    assert by_id.outputs[0].finish_reason == "stop"
    assert by_id.outputs[0].text == tokenizer.decode(tokens[: cut - 1], skip_special_tokens=False)

    # A stop string: the text ends right before it, tokens end with the one that completed it.
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (by_str,) = engine.generate(PROMPTS[:1], greedy.replace(stop=(stop,)))
    assert by_str.outputs[0].finish_reason == "stop"
    assert by_str.outputs[0].text == text[: text.find(stop)]
    assert stop in tokenizer.decode(by_str.outputs[0].token_ids, skip_special_tokens=False)
    assert stop not in tokenizer.decode(by_str.outputs[0].token_ids[:-1], skip_special_tokens=False)

    # max_new_tokens per request in one batch.
    short, long = engine.generate(PROMPTS[:2], [greedy.replace(max_new_tokens=2), greedy.replace(max_new_tokens=5)])
    assert len(short.outputs[0].token_ids) == 2 and len(long.outputs[0].token_ids) == 5


def test_stop_strings_found_while_the_next_chunk_runs(mla_model, tokenizer):
    """Once no row waits for a slot, the engine dispatches the next chunk before it reads the last one, so a row
    that a stop string ends on the host decodes one more chunk on the device. Its output still ends right
    before the string, its slot's extra tokens reach no one, and every row stays greedy. Four prompts in two
    slots: rows 2 and 3 wait at first (refills), then run with the host a chunk behind."""
    engine = Engine(mla_model, tokenizer, max_batch_size=2, chunk_size=2)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    free = [out.outputs[0] for out in engine.generate(PROMPTS, greedy)]
    stops = [c.text[2 * len(c.text) // 3 :][:2] for c in free]  # late in each row's own text
    outs = engine.generate(PROMPTS, [greedy.replace(stop=(stop,)) for stop in stops])
    for prompt, want, stop, out in zip(PROMPTS, free, stops, outs, strict=True):
        got = out.outputs[0]
        assert_greedy(mla_model, prompt, got.token_ids)
        assert got.finish_reason == "stop"
        assert got.text == want.text[: want.text.find(stop)]
        assert got.token_ids == want.token_ids[: len(got.token_ids)]


def test_eos_ends_a_row(mla_model, tokenizer):
    """The tokenizer's EOS stops a row (returned in token_ids, left out of the text)."""
    engine = Engine(mla_model, tokenizer)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    tokens = engine.generate(PROMPTS[:1], greedy)[0].outputs[0].token_ids
    engine.eos_ids = [tokens[2]]  # pretend the third greedy token is the EOS
    (out,) = engine.generate(PROMPTS[:1], greedy)
    assert out.outputs[0].token_ids == tokens[: tokens.index(tokens[2]) + 1]
    assert out.outputs[0].finish_reason == "stop"


def test_streaming_deltas_add_up_to_the_text(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer, chunk_size=2)
    pieces: dict[tuple[int, int], list[str]] = {}
    finishes = {}

    def on_update(request, sample, delta, finish):
        pieces.setdefault((request, sample), []).append(delta)
        if finish is not None:
            finishes[(request, sample)] = finish

    outs = engine.generate(
        PROMPTS[:3], SamplingParams(temperature=0.8, max_new_tokens=9, n=2, seed=1), on_update=on_update
    )
    for r, out in enumerate(outs):
        for c in out.outputs:
            assert "".join(pieces[(r, c.index)]) == c.text
            assert finishes[(r, c.index)] == c.finish_reason
            assert len(pieces[(r, c.index)]) > 1  # streamed in pieces, not all at the end


def test_engine_shares_the_models_arrays(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer)
    assert engine.params["embed"]["embedding"] is mla_model.embed.embedding.value
    assert engine.params["layers"][1]["mlp"]["experts"]["gate_proj"] is mla_model.layers[1].mlp.experts.gate_proj.value


def test_bad_prompts_name_the_prompt(mla_model, tokenizer):
    engine = Engine(mla_model, tokenizer, max_seq_len=64)
    with pytest.raises(UserError, match="prompt 1: the prompt is empty"):
        engine.generate([[1, 2], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(UserError, match=r"prompt 0: prompt too long: 60 tokens \+ max_new_tokens 8 > max_seq_len 64"):
        engine.generate([[3] * 60], SamplingParams(max_new_tokens=8))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([[3, 100_000]], SamplingParams(max_new_tokens=2))
    with pytest.raises(UserError, match="top_p must lie in"):
        SamplingParams(top_p=0)
    assert engine.check_prompt([1] * 10, SamplingParams(max_new_tokens=8)) is None


def test_from_pretrained_reads_checkpoint_and_tokenizer(checkpoint_dir, mla_model, tokenizer):
    engine = Engine.from_pretrained(checkpoint_dir, max_batch_size=4)
    want = Engine(mla_model, tokenizer).generate(["12+34="], SamplingParams(temperature=0, max_new_tokens=6))
    got = engine.generate(["12+34="], SamplingParams(temperature=0, max_new_tokens=6))
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(UserError, match="no tokenizer found"):
        Engine.from_pretrained(checkpoint_dir, tokenizer=str(checkpoint_dir / "params"))
    # The decode kernels are a load-time switch; same tokens (the MLA latent decode kernel, interpreted on CPU).
    kernels = Engine.from_pretrained(
        checkpoint_dir, max_batch_size=4, model_overrides={"attention_impl": "pallas_interpret"}
    )
    assert kernels.config.attention_impl == "pallas_interpret"
    got = kernels.generate(["12+34="], SamplingParams(temperature=0, max_new_tokens=6))
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(UserError, match=r"\['attention_kernel'\] are not model config fields"):
        Engine.from_pretrained(checkpoint_dir, model_overrides={"attention_kernel": "pallas"})


def test_decode_is_one_compiled_loop(mla_model, tokenizer):
    """The decode chunk is a single while loop over the slots (no per-token dispatch from Python)."""
    engine = Engine(mla_model, tokenizer)
    engine.generate(PROMPTS[:1], SamplingParams(temperature=0, max_new_tokens=4))
    assert _decode._cache_size() >= 1
