"""The generation engine: jitted prefill + chunked decode over a fixed set of slots, continuously refilled.

    engine = Engine.from_pretrained("runs/demo/model")
    outs = engine.generate(["1+2="], SamplingParams(temperature=0.6, top_p=0.95, n=4, max_new_tokens=256))

Device side (static shapes, compiled once per bucket):
  `_prefill`  right-padded prompts [Bp, P] -> per-layer caches of `cache_len` positions, the first sampled
              token of every row (n rows of one prompt share its prefill: the caches are gathered per row).
  `_insert`   those rows into free slots of the running decode state.
  `_decode`   up to `chunk_size` steps of every slot in one `lax.while_loop`: feed each slot's last token at
              its own position (a ragged batch), sample the next, stop on EOS/stop tokens or max_new_tokens.
              Attention reads the shortest cache prefix (64, 96, 128, 192, ...) that holds the chunk's rows,
              chosen by the host per chunk (one compiled loop per prefix used).
Host side, between chunks: read the new tokens, detokenize, check stop strings, hand out text deltas
(streaming), retire finished rows and prefill waiting ones into their slots (continuous batching). Once no row
waits for a slot, the host reads each chunk while the next one already runs.

Buckets: the slot count is the smallest power of two >= the rows asked for (at most `max_batch_size`), prompt
lengths round up to powers of two, the cache to a power of two >= the longest prompt + max_new_tokens.

The engine keeps the model as (graphdef, params, buffers) of the very arrays it was given: with a mesh, those
keep their training shardings and enter the jitted functions as they are (no copy, no reshard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from openr1_jax.errors import UserError
from openr1_jax.generate.sampling import RowSampling, SamplingParams, row_sampling, sample
from openr1_jax.models import kv_cache
from openr1_jax.sharding.context import constrain, sharding_context
from openr1_jax.sharding.init import merge_model, split_model
from openr1_jax.sharding.rules import DEFAULT_RULES, Rules

UpdateFn = Callable[[int, int, str, "str | None"], None]


@dataclass
class Completion:
    index: int  # sample index within the request (0 .. n-1)
    text: str  # without the EOS token and without anything from a stop string on
    token_ids: list[int]  # the sampled tokens, EOS / stop token included
    logprobs: list[float] | None  # of token_ids under log_softmax(logits / temperature)
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[Completion]


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """Everything the decode loop carries, one row per slot."""

    caches: tuple[Any, ...]  # per layer: LatentCache / KVCache, [B, S, ...]
    token_B: jax.Array  # the last sampled token (fed next)
    position_B: jax.Array  # where token_B goes in the cache
    count_B: jax.Array  # tokens sampled so far
    done_B: jax.Array
    max_new_B: jax.Array
    stop_ids_BxZ: jax.Array  # EOS and stop token ids, -1 padded
    tokens_BxM: jax.Array  # sampled tokens
    logprobs_BxM: jax.Array
    sampling: RowSampling


@functools.lru_cache(maxsize=64)
def static_graph(graphdef) -> StaticGraph:
    """The one StaticGraph of equal GraphDefs, so that jit's cache finds its key by identity (engines built on the
    same model share compiled programs without comparing node trees on every call)."""
    return StaticGraph(graphdef)


class StaticGraph:
    """A model's GraphDef as a static jit argument, hashed once. jit hashes its static arguments on every call, and
    an nnx GraphDef hashes its whole node tree each time (~1 ms for tiny-moe, several times per generate call)."""

    __slots__ = ("_hash", "graphdef")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (other.graphdef is self.graphdef or other.graphdef == self.graphdef)


def _bucket(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def _constrain_rows(tree):
    return jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)), tree)


@partial(jax.jit, static_argnames=("graph", "cache_len", "max_new"))
def _prefill(
    graph: StaticGraph,
    params,
    buffers,
    ids_BpxP: jax.Array,
    lengths_Bp: jax.Array,
    prompt_of_row_B: jax.Array,
    max_new_B: jax.Array,
    stop_ids_BxZ: jax.Array,
    sampling: RowSampling,
    *,
    cache_len: int,
    max_new: int,
) -> DecodeState:
    model = merge_model(graph.graphdef, params, buffers)  # merged per trace: the MoE's sown statistics stay local
    Bp = ids_BpxP.shape[0]
    h_BpxPxD, caches = model.prefill(ids_BpxP, lengths_Bp, model.init_cache(Bp, cache_len))
    last_BpxD = h_BpxPxD[jnp.arange(Bp), lengths_Bp - 1]
    logits_BxV = model.head(last_BpxD[:, None])[:, 0][prompt_of_row_B]
    caches = jax.tree.map(lambda a: a[prompt_of_row_B], caches)  # the n samples of a prompt share its prefill
    B = prompt_of_row_B.shape[0]
    token_B, logprob_B = sample(logits_BxV, sampling, jnp.zeros((B,), jnp.int32))
    done_B = jnp.any(token_B[:, None] == stop_ids_BxZ, axis=-1) | (max_new_B <= 1)
    state = DecodeState(
        caches=caches,
        token_B=token_B,
        position_B=lengths_Bp[prompt_of_row_B],
        count_B=jnp.ones((B,), jnp.int32),
        done_B=done_B,
        max_new_B=max_new_B,
        stop_ids_BxZ=stop_ids_BxZ,
        tokens_BxM=jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(token_B),
        logprobs_BxM=jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(logprob_B),
        sampling=sampling,
    )
    return _constrain_rows(state)


@partial(jax.jit, donate_argnames=("state",))
def _insert(state: DecodeState, new: DecodeState, slot_of_row: jax.Array) -> DecodeState:
    """Row i of `new` goes to slot slot_of_row[i]; rows aimed past the last slot (bucket padding) are dropped."""
    return jax.tree.map(lambda s, n: s.at[slot_of_row].set(n, mode="drop"), state, new)


@partial(jax.jit, static_argnames=("graph", "steps", "prefix", "logprobs", "unroll"), donate_argnames=("state",))
def _decode(
    graph: StaticGraph,
    params,
    buffers,
    state: DecodeState,
    *,
    steps: int,
    prefix: int,
    logprobs: bool = True,
    unroll: int = 1,
) -> DecodeState:
    """Up to `steps` decode steps attending over the first `prefix` cache positions: the chunk slices the caches
    once (into the layout the model's decode reads fastest) and writes them back once, so no step copies a
    prefix out of the cache. A row about to write at or past `prefix` ends the chunk early (the host chose
    `prefix` to hold every row's chunk; this keeps it safe). logprobs=False: no row of the call wants them, so
    none are computed (the log_softmax over the vocabulary is ~3% of a small model's step). unroll=u: a first
    loop runs u steps per iteration while all u would run, a second loop the rest (the same steps, the same
    results; `openr1-jax plan` compiles u=2 to tell one step's cost from the chunk's one-off work)."""
    model = merge_model(graph.graphdef, params, buffers)
    B, M = state.tokens_BxM.shape
    rows_B = jnp.arange(B)
    full_caches = state.caches
    chunk_caches = model.caches_for_decode_loop(jax.tree.map(lambda a: a[:, :prefix], full_caches))
    state = dataclasses.replace(state, caches=chunk_caches)

    def step(carry):
        i, s = carry
        h_BxTxD, caches = model.decode(s.token_B[:, None], s.position_B, s.caches)
        token_B, logprob_B = sample(model.head(h_BxTxD)[:, 0], s.sampling, s.count_B, logprobs=logprobs)
        live_B = ~s.done_B
        slot_B = jnp.minimum(s.count_B, M - 1)
        tokens_BxM = s.tokens_BxM.at[rows_B, slot_B].set(jnp.where(live_B, token_B, s.tokens_BxM[rows_B, slot_B]))
        logprobs_BxM = s.logprobs_BxM.at[rows_B, slot_B].set(
            jnp.where(live_B, logprob_B, s.logprobs_BxM[rows_B, slot_B])
        )
        count_B = s.count_B + live_B
        stopped_B = jnp.any(token_B[:, None] == s.stop_ids_BxZ, axis=-1) | (count_B >= s.max_new_B)
        s = dataclasses.replace(
            s,
            caches=caches,
            token_B=jnp.where(live_B, token_B, s.token_B),
            position_B=s.position_B + live_B,
            count_B=count_B,
            done_B=s.done_B | (live_B & stopped_B),
            tokens_BxM=tokens_BxM,
            logprobs_BxM=logprobs_BxM,
        )
        return i + 1, _constrain_rows(s)

    def go_on(carry):
        i, s = carry
        return (i < steps) & ~jnp.all(s.done_B) & jnp.all(s.done_B | (s.position_B < prefix))

    def go_on_for_all(carry):  # all `unroll` next steps would run (a row done midway does nothing in the rest)
        i, s = carry
        fits_B = s.position_B + (unroll - 1) < prefix
        return (i + (unroll - 1) < steps) & ~jnp.all(s.done_B) & jnp.all(s.done_B | fits_B)

    def unrolled(carry):
        for _ in range(unroll):
            carry = step(carry)
        return carry

    carry = (jnp.int32(0), state)
    if unroll > 1:
        carry = jax.lax.while_loop(go_on_for_all, unrolled, carry)
    _, state = jax.lax.while_loop(go_on, step, carry)
    chunk_caches = tuple(kv_cache.storage_layout(cache) for cache in state.caches)
    caches = jax.tree.map(lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, 0, axis=1), full_caches, chunk_caches)
    return dataclasses.replace(state, caches=caches)


@jax.jit
def _host_view(state: DecodeState) -> tuple[jax.Array, ...]:
    """What the host reads between chunks, replicated: with several processes the rows are spread over all of
    their devices, and each process reads (and makes the same decisions from) every row. Copies, not the state's
    own buffers: the next chunk may be dispatched (donating the state) before the host reads them."""
    view = (state.position_B, state.count_B, state.done_B, state.tokens_BxM, state.logprobs_BxM)
    return jax.tree.map(lambda a: constrain(jnp.copy(a), (None,) * a.ndim), view)


@partial(jax.jit, donate_argnames=("state",))
def _stop_rows(state: DecodeState, slots: jax.Array) -> DecodeState:
    return dataclasses.replace(state, done_B=state.done_B.at[slots].set(True))


@partial(jax.jit, static_argnames=("graph", "slots", "cache_len", "max_new", "num_stop"))
def _empty_state(graph: StaticGraph, params, buffers, *, slots: int, cache_len: int, max_new: int, num_stop: int):
    model = merge_model(graph.graphdef, params, buffers)
    B = slots
    zeros_B = jnp.zeros((B,), jnp.int32)
    state = DecodeState(
        caches=model.init_cache(B, cache_len),
        token_B=zeros_B,
        position_B=zeros_B,
        count_B=zeros_B,
        done_B=jnp.ones((B,), bool),
        max_new_B=zeros_B,
        stop_ids_BxZ=jnp.full((B, num_stop), -1, jnp.int32),
        tokens_BxM=jnp.zeros((B, max_new), jnp.int32),
        logprobs_BxM=jnp.zeros((B, max_new), jnp.float32),
        sampling=RowSampling(
            temperature_B=jnp.zeros((B,), jnp.float32),
            top_k_B=jnp.ones((B,), jnp.int32),
            top_p_B=jnp.ones((B,), jnp.float32),
            min_p_B=jnp.zeros((B,), jnp.float32),
            key_data_BxK=jax.random.key_data(jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))),
        ),
    )
    return _constrain_rows(state)


@dataclass
class _Row:
    """One sample of one request, on the host."""

    request: int
    sample: int
    params: SamplingParams
    seed: int
    stop_ids: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    emitted: int = 0  # characters of text already handed to on_update
    finish_reason: str | None = None
    text: str = ""


class Engine:
    """Batched sampling from a CausalLM with a preallocated cache (MLA: latent-only, absorbed decode)."""

    def __init__(self, model, tokenizer, **options):
        """options: mesh (place rows on its batch axes; the parameters keep their own shardings), rules,
        max_batch_size (slots decoded together, default 32), max_seq_len (prompt + new tokens, default the
        model's max_position_embeddings), chunk_size (decode steps between host checks, default 32), seed
        (first of the seeds drawn for requests without one, default 0)."""
        graphdef, params, buffers = split_model(_without_intermediates(model))
        self._setup(graphdef, params, buffers, model.config, tokenizer, **options)

    @classmethod
    def from_state(cls, graphdef, params, buffers, config, tokenizer, **options) -> Engine:
        """An engine over a train state's own arrays (GRPO: rollouts read the parameters being trained)."""
        engine = cls.__new__(cls)
        engine._setup(graphdef, params, buffers, config, tokenizer, **options)
        return engine

    def _setup(
        self,
        graphdef,
        params,
        buffers,
        config,
        tokenizer,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: Rules = DEFAULT_RULES,
        max_batch_size: int = 32,
        max_seq_len: int | None = None,
        chunk_size: int = 32,
        seed: int = 0,
    ) -> None:
        if max_batch_size < 1 or chunk_size < 1:
            raise UserError(f"max_batch_size ({max_batch_size}) and chunk_size ({chunk_size}) must be >= 1")
        self.graphdef, self.params, self.buffers = graphdef, params, buffers
        self.graph = static_graph(graphdef)
        self.config = config
        self.tokenizer = tokenizer
        self.mesh, self.rules = mesh, rules
        self.max_batch_size = max_batch_size
        self.chunk_size = chunk_size
        self._seeds = itertools.count(seed)
        limit = config.max_position_embeddings
        if max_seq_len is not None and not 1 < max_seq_len <= limit:
            raise UserError(f"max_seq_len must lie in [2, {limit}] (the model's max_position_embeddings)")
        self.max_seq_len = max_seq_len or limit
        self.eos_ids = eos_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, tokenizer=None, dtype: str = "float32", mesh=None, model_overrides=None, **kwargs
    ):
        """A Hugging Face folder or an openr1-jax checkpoint; the tokenizer from the same folder by default.
        `model_overrides`: ModelConfig fields that leave the parameters alone (e.g. attention_impl="pallas")."""
        from openr1_jax.models.load import load_model

        tok = load_tokenizer_for(path, tokenizer)
        model = load_model(path, dtype=dtype, mesh=mesh, **(model_overrides or {}))
        return cls(model, tok, mesh=mesh, **kwargs)

    def set_params(self, params, buffers=None) -> None:
        """Swap in new parameter arrays (same structure and shardings), e.g. after an optimizer step."""
        self.params = params
        if buffers is not None:
            self.buffers = buffers

    # ------------------------------------------------------------------------------------------------------
    # Prompts
    # ------------------------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict], *, system_prompt: str | None = None) -> str:
        """The tokenizer's chat template over `messages`, ending with the assistant turn's header."""
        if system_prompt is not None and (not messages or messages[0].get("role") != "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: a bad conversation or template
            raise UserError(f"the chat template failed on a conversation with {len(messages)} messages: {e}") from e

    def check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> str | None:
        """Why this prompt cannot run with these parameters, or None."""
        if len(prompt_ids) == 0:
            return "the prompt is empty"
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            return (
                f"prompt too long: {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} > "
                f"max_seq_len {self.max_seq_len}"
            )
        vocab = self.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})"
        return None

    # ------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_update: UpdateFn | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Sample `params.n` completions of every prompt. See the module docstring for how."""
        if not prompts:
            return []
        prompt_ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        params = SamplingParams() if params is None else params
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompt_ids):
            raise UserError(f"{len(per_prompt)} sampling parameters for {len(prompt_ids)} prompts")
        for i, (ids, p) in enumerate(zip(prompt_ids, per_prompt, strict=True)):
            reason = self.check_prompt(ids, p)
            if reason is not None:
                raise UserError(f"prompt {i}: {reason}")
        rows = []
        for i, p in enumerate(per_prompt):
            seed = next(self._seeds) if p.seed is None else p.seed
            stop_ids = sorted((set() if p.ignore_eos else set(self.eos_ids)) | set(p.stop_token_ids))
            rows += [_Row(i, j, p, seed, stop_ids) for j in range(p.n)]

        context = sharding_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
        with context:
            self._run(rows, prompt_ids, on_update, progress)
        outputs = [RequestOutput(ids, []) for ids in prompt_ids]
        for row in rows:
            logprobs = row.logprobs if row.params.logprobs else None
            outputs[row.request].outputs.append(
                Completion(row.sample, row.text, row.tokens, logprobs, row.finish_reason or "length")
            )
        return outputs

    def _run(self, rows: list[_Row], prompt_ids: list[list[int]], on_update: UpdateFn | None, progress: bool):
        slots = min(self.max_batch_size, _bucket(len(rows), minimum=1))
        longest = max(len(prompt_ids[r.request]) + r.params.max_new_tokens for r in rows)
        cache_len = _bucket(longest)
        max_new = _bucket(max(r.params.max_new_tokens for r in rows))
        num_stop = _bucket(max(max(len(r.stop_ids) for r in rows), 1), minimum=1)
        state = _empty_state(
            self.graph,
            self.params,
            self.buffers,
            slots=slots,
            cache_len=cache_len,
            max_new=max_new,
            num_stop=num_stop,
        )
        waiting = deque(rows)
        in_slot: list[_Row | None] = [None] * slots
        # Where each slot writes next when the next chunk starts (at most): a chunk attends over the shortest
        # cache prefix that holds every row's next `chunk_size` positions, short of the position a row never
        # writes (prompt + max_new_tokens - 1).
        next_pos = np.zeros(slots, np.int64)
        logprobs = any(row.params.logprobs for row in rows)

        def decode_chunk(state: DecodeState) -> DecodeState:
            steps = self.chunk_size
            live = {slot: row for slot, row in enumerate(in_slot) if row is not None}
            ends = {slot: len(prompt_ids[row.request]) + row.params.max_new_tokens - 1 for slot, row in live.items()}
            needed = max((min(next_pos[slot] + steps, ends[slot]) for slot in live), default=1)
            next_pos[list(live)] += steps
            prefix = kv_cache.shortest_prefix(int(needed), cache_len)
            return _decode(self.graph, self.params, self.buffers, state, steps=steps, prefix=prefix, logprobs=logprobs)

        bar = tqdm(total=len(rows), desc="generate", unit="seq", disable=not progress, leave=False)
        tokens_done, start = 0, time.perf_counter()
        ahead = False  # whether the chunk after the one being read is already running
        while waiting or any(in_slot):
            free = [i for i, r in enumerate(in_slot) if r is None]
            if free and waiting:
                batch = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                new = self._prefill(batch, prompt_ids, cache_len, max_new, num_stop)
                targets = free[: len(batch)]
                slot_of_row = np.full(new.token_B.shape[0], slots, np.int32)  # `slots` = dropped
                slot_of_row[: len(batch)] = targets
                state = _insert(state, new, jnp.asarray(slot_of_row))
                for slot, row in zip(targets, batch, strict=True):
                    in_slot[slot] = row
                    next_pos[slot] = len(prompt_ids[row.request])
            if not ahead:
                state = decode_chunk(state)
            view = _host_view(state)
            # With no row waiting for a slot, the next chunk needs nothing from the host: dispatch it now, so the
            # device decodes while the host detokenizes this one. A stop string found below then stops its row
            # one chunk late on the device; the host has retired the row by then and ignores those tokens.
            ahead = not waiting
            if ahead:
                state = decode_chunk(state)
            position_B, count_B, done_B, tokens_BxM, logprobs_BxM = jax.device_get(view)
            stopped = []
            for slot, row in enumerate(in_slot):
                if row is None:
                    continue
                next_pos[slot] = position_B[slot] + (self.chunk_size if ahead else 0)
                n = int(count_B[slot])
                tokens_done += n - len(row.tokens)
                row.tokens = tokens_BxM[slot, :n].tolist()
                row.logprobs = logprobs_BxM[slot, :n].tolist()
                finished = self._advance_text(row, bool(done_B[slot]), on_update)
                if finished:
                    if not done_B[slot]:
                        stopped.append(slot)
                    in_slot[slot] = None
                    bar.update(1)
            if stopped:  # stop strings are found on the host: tell the device those rows are over
                state = _stop_rows(state, np.asarray(stopped, np.int32))
            bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.close()

    def _prefill(self, batch: list[_Row], prompt_ids, cache_len: int, max_new: int, num_stop: int) -> DecodeState:
        """The first token of every row of `batch` (prompts prefilled once however many samples they have)."""
        prompts = sorted({r.request for r in batch})
        index_of = {p: i for i, p in enumerate(prompts)}
        Bp = _bucket(len(prompts), minimum=1)
        B = _bucket(len(batch), minimum=1)
        P = min(_bucket(max(len(prompt_ids[p]) for p in prompts)), cache_len)
        ids = np.full((Bp, P), self.pad_id, np.int32)
        lengths = np.ones((Bp,), np.int32)
        for p, i in index_of.items():
            ids[i, : len(prompt_ids[p])] = prompt_ids[p]
            lengths[i] = len(prompt_ids[p])
        padded = batch + [batch[0]] * (B - len(batch))  # bucket padding rows, never inserted
        stop_ids = np.full((B, num_stop), -1, np.int32)
        for i, r in enumerate(padded):
            stop_ids[i, : len(r.stop_ids)] = r.stop_ids
        sampling = row_sampling(
            [r.params for r in padded], [r.seed for r in padded], [r.sample for r in padded], self.config.vocab_size
        )
        return _prefill(
            self.graph,
            self.params,
            self.buffers,
            jnp.asarray(ids),
            jnp.asarray(lengths),
            jnp.asarray([index_of[r.request] for r in padded], jnp.int32),
            jnp.asarray([r.params.max_new_tokens for r in padded], jnp.int32),
            jnp.asarray(stop_ids),
            sampling,
            cache_len=cache_len,
            max_new=max_new,
        )

    def _advance_text(self, row: _Row, done: bool, on_update: UpdateFn | None) -> bool:
        """Detokenize the row, apply stop strings, emit the new text; True when the row is finished."""
        tokens = row.tokens
        ends_on_stop_id = done and tokens and tokens[-1] in row.stop_ids
        text = self._decode_text(tokens[:-1] if ends_on_stop_id else tokens)
        finish = ("stop" if ends_on_stop_id else "length") if done else None
        hit = _find_stop(text, row.params.stop, max(0, row.emitted - _longest(row.params.stop)))
        if hit is not None:
            text, finish = text[:hit], "stop"
            row.tokens, row.logprobs = self._tokens_through_stop(row, hit)
        if finish is None:
            # Hold back what may be the start of a stop string, and a half-decoded multi-byte character.
            visible = len(text) - max(_longest(row.params.stop) - 1, 0)
            while visible > 0 and text[visible - 1] == "\ufffd":
                visible -= 1
        else:
            visible = len(text)
        visible = max(visible, row.emitted)
        if on_update is not None and (visible > row.emitted or finish is not None):
            on_update(row.request, row.sample, text[row.emitted : visible], finish)
        row.emitted, row.text, row.finish_reason = visible, text, finish
        return finish is not None

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _tokens_through_stop(self, row: _Row, hit: int) -> tuple[list[int], list[float]]:
        """The shortest token prefix whose text contains the stop string that starts at character `hit`."""
        for k in range(1, len(row.tokens) + 1):
            if _find_stop(self._decode_text(row.tokens[:k]), row.params.stop, 0) == hit:
                return row.tokens[:k], row.logprobs[:k]
        return row.tokens, row.logprobs


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest(stops: Sequence[str]) -> int:
    return max((len(s) for s in stops), default=0)


def eos_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS id(s) as a list (some tokenizers have several)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token: generation needs one to know where answers end")
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _without_intermediates(model):
    """The model without values sown by earlier calls (MoE statistics), sharing its parameter arrays."""
    model = nnx.clone(model)
    nnx.pop(model, nnx.Intermediate)
    return model


def load_tokenizer_for(path: str | Path, tokenizer=None):
    """`tokenizer`: a loaded tokenizer, a folder, "embedded", or None = the model folder's own (an openr1-jax
    checkpoint keeps it under hf/)."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    if tokenizer == "embedded":
        from openr1_jax.data import embedded

        tokenizer = embedded.TOKENIZER_DIR
    from openr1_jax.data.embedded.base_model import resolve_model_path

    path = resolve_model_path(path)
    candidates = [Path(tokenizer)] if tokenizer is not None else [path, path / "hf"]
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except Exception as e:  # broken files: one sentence for the user
                raise UserError(f"cannot load the tokenizer in {folder}: {e}") from e
    where = " or ".join(str(c) for c in candidates)
    raise UserError(f"no tokenizer found in {where}; pass a tokenizer folder (or 'embedded')")
