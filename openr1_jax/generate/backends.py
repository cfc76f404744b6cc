"""Where completions come from: our JAX engine in-process, or an OpenAI-compatible server over HTTP.

Both take PromptRows and yield lists of (row, Generated) as rows finish, so the runner can append each list to
the output at once. A row that cannot be generated (prompt too long, the server unreachable after retries)
comes back as a Generated with `error` set, never as an exception: finished rows are never lost to one bad row.

Seeds: every row samples from a seed derived from `sampling.seed` and the row's id (the endpoint: and the
sample index), so a row's completions do not depend on which batch it rode in, and a resumed run produces what
an uninterrupted one would have.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from openr1_jax.data.chat import read_template
from openr1_jax.errors import UserError
from openr1_jax.generate.config import GenerateConfig
from openr1_jax.generate.openai_client import OpenAIClient, RequestFailed
from openr1_jax.generate.prompts import PromptRow, id_key


@dataclass
class Generated:
    generations: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: list[int | None] = field(default_factory=list)
    error: str | None = None


def derived_seed(base: int | None, row_id: Any, sample: int | None = None) -> int | None:
    """A uint32 seed from the config's seed, the row id and (for one-sample requests) the sample index."""
    if base is None:
        return None
    text = f"{base}:{id_key(row_id)}" + ("" if sample is None else f":{sample}")
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def make_backend(cfg: GenerateConfig) -> EngineBackend | OpenAIBackend:
    return EngineBackend(cfg) if cfg.backend == "engine" else OpenAIBackend(cfg)


# ----------------------------------------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------------------------------------
class EngineBackend:
    def __init__(self, cfg: GenerateConfig):
        from openr1_jax.data.embedded.base_model import resolve_model_path
        from openr1_jax.generate import Engine, SamplingParams

        ec = cfg.engine
        self.model_path = resolve_model_path(ec.model)
        if not self.model_path.exists():
            raise UserError(f"engine.model '{ec.model}' does not exist: train one with `openr1-jax sft` or set it")
        self.cfg = cfg
        self.engine = Engine.from_pretrained(
            self.model_path,
            tokenizer=ec.tokenizer,
            dtype=ec.dtype,
            model_overrides=ec.model_overrides,
            max_batch_size=ec.max_batch_size,
            max_seq_len=ec.max_seq_len,
        )
        tokenizer = self.engine.tokenizer
        if cfg.chat_template is not None:
            tokenizer.chat_template = read_template(cfg.chat_template)
        if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"the tokenizer of '{ec.model}' has no chat template; set chat_template or use_chat_template: false"
            )
        s = cfg.sampling
        self._params = SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            n=cfg.num_generations,
            stop=tuple(s.stop),
            logprobs=False,
        )

    def identity(self) -> dict[str, Any]:
        ec = self.cfg.engine
        return {"backend": "engine", "model": str(self.model_path.absolute()), "dtype": ec.dtype}

    def run(self, rows: Iterable[PromptRow]) -> Iterator[list[tuple[PromptRow, Generated]]]:
        rows = iter(rows)
        while chunk := list(islice(rows, self.cfg.batch_size)):
            yield self._generate(chunk)

    def _generate(self, chunk: list[PromptRow]) -> list[tuple[PromptRow, Generated]]:
        results: dict[int, Generated] = {}
        todo: list[tuple[int, list[int], Any]] = []
        for i, row in enumerate(chunk):
            if row.error is not None:
                results[i] = Generated(error=row.error)
                continue
            try:
                text = self.engine.chat_prompt(row.messages) if row.messages is not None else row.prompt
            except UserError as err:
                results[i] = Generated(error=str(err))
                continue
            ids = self.engine.encode(text)
            params = self._params.replace(seed=derived_seed(self.cfg.sampling.seed, row.id))
            reason = self.engine.check_prompt(ids, params)
            if reason is not None:
                results[i] = Generated(prompt_tokens=len(ids), error=reason)
            else:
                todo.append((i, ids, params))
        if todo:
            outs = self.engine.generate([ids for _, ids, _ in todo], [p for _, _, p in todo])
            for (i, ids, _), out in zip(todo, outs, strict=True):
                samples = sorted(out.outputs, key=lambda c: c.index)
                results[i] = Generated(
                    generations=[c.text for c in samples],
                    finish_reasons=[c.finish_reason for c in samples],
                    prompt_tokens=len(ids),
                    completion_tokens=[len(c.token_ids) for c in samples],
                )
        return [(row, results[i]) for i, row in enumerate(chunk)]

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ----------------------------------------------------------------------------------------------------------
class OpenAIBackend:
    """One request per sample (n=1): per-sample token counts and retries, and the server batches them anyway."""

    def __init__(self, cfg: GenerateConfig):
        oc = cfg.openai
        self.cfg = cfg
        api_key = os.environ.get(oc.api_key_env) if oc.api_key_env else None
        self.client = OpenAIClient(
            oc.base_url, api_key=api_key, timeout_s=oc.timeout_s, max_retries=oc.max_retries, backoff_s=oc.backoff_s
        )
        self.path = "chat/completions" if oc.endpoint == "chat" else "completions"
        self.tokenizer = None
        if oc.endpoint == "completions" and cfg.use_chat_template:
            from openr1_jax.generate.engine import load_tokenizer_for

            # A model folder or checkpoint (its tokenizer, also under hf/), a tokenizer folder, or "embedded".
            self.tokenizer = load_tokenizer_for(oc.tokenizer, "embedded" if oc.tokenizer == "embedded" else None)
            if cfg.chat_template is not None:
                self.tokenizer.chat_template = read_template(cfg.chat_template)
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError(f"openai.tokenizer '{oc.tokenizer}' has no chat template; set chat_template")
        self.model = oc.model or self._served_model()

    def _served_model(self) -> str:
        try:
            answer = self.client.get("models")
            return str(answer["data"][0]["id"])
        except (RequestFailed, KeyError, IndexError, TypeError) as err:
            raise UserError(
                f"cannot learn the model name from {self.cfg.openai.base_url}/models ({err}); set openai.model"
            ) from None

    def identity(self) -> dict[str, Any]:
        oc = self.cfg.openai
        return {"backend": "openai", "model": self.model, "endpoint": oc.endpoint}

    def run(self, rows: Iterable[PromptRow]) -> Iterator[list[tuple[PromptRow, Generated]]]:
        n = self.cfg.num_generations
        limit = 2 * self.cfg.openai.max_concurrency  # requests queued ahead: keeps the server fed, memory bounded
        rows = iter(rows)
        pool = cf.ThreadPoolExecutor(self.cfg.openai.max_concurrency, thread_name_prefix="openr1-generate")
        pending: dict[cf.Future, tuple[_RowState, int]] = {}
        exhausted = False
        try:
            while True:
                ready: list[tuple[PromptRow, Generated]] = []
                while not exhausted and len(pending) < limit and len(ready) < limit:
                    row = next(rows, None)
                    if row is None:
                        exhausted = True
                    elif row.error is not None:
                        ready.append((row, Generated(error=row.error)))
                    else:
                        state = _RowState(row, [None] * n)
                        for sample in range(n):
                            pending[pool.submit(self._request, row, sample)] = (state, sample)
                if not pending:  # only rows that failed before any request (or nothing left)
                    if ready:
                        yield ready
                    if exhausted:
                        return
                    continue
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    state, sample = pending.pop(future)
                    state.samples[sample] = future.result()
                    if all(s is not None for s in state.samples):
                        ready.append((state.row, _merge(state.samples)))
                if ready:
                    yield ready
        finally:
            self.client.close()  # interrupts retry waits of requests still in flight
            pool.shutdown(wait=False, cancel_futures=True)  # a stalled request must not hold up an interrupt

    def _request(self, row: PromptRow, sample: int) -> Generated:
        """One sample; never raises (a failure is the returned Generated's error)."""
        try:
            answer = self.client.post(self.path, self._body(row, sample))
            choice = answer["choices"][0]
            if self.path == "completions":
                text = choice["text"]
            else:
                message = choice["message"]
                text = message.get("content") or ""
                # vLLM's reasoning parsers move the <think> part out of content; a distillation trace needs it.
                reasoning = message.get("reasoning_content") or message.get("reasoning")
                if reasoning:
                    text = f"<think>\n{reasoning}\n</think>\n\n{text}"
            usage = answer.get("usage") or {}
            return Generated(
                generations=[text],
                finish_reasons=[str(choice.get("finish_reason") or "unknown")],
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=[usage.get("completion_tokens")],
            )
        except RequestFailed as err:
            return Generated(error=str(err))
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            return Generated(error=f"the server's answer lacks the expected fields ({type(err).__name__}: {err})")
        except Exception as err:  # a bug or an odd answer must cost one row, not the finished ones
            return Generated(error=f"{type(err).__name__}: {err}")

    def _body(self, row: PromptRow, sample: int) -> dict[str, Any]:
        s = self.cfg.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "n": 1,
        }
        if s.top_k != -1:  # vLLM extensions: sent only when used, so plain OpenAI servers accept the rest
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        if s.stop:
            body["stop"] = list(s.stop)
        seed = derived_seed(s.seed, row.id, sample)
        if seed is not None:
            body["seed"] = seed
        if self.path == "completions":
            if self.tokenizer is not None:
                body["prompt"] = self.tokenizer.apply_chat_template(
                    row.messages, tokenize=False, add_generation_prompt=True
                )
            else:
                body["prompt"] = row.prompt
        else:
            body["messages"] = row.messages
            if self.cfg.chat_template is not None:
                body["chat_template"] = read_template(self.cfg.chat_template)  # vLLM's per-request override
        return body

    def close(self) -> None:
        self.client.close()


@dataclass
class _RowState:
    row: PromptRow
    samples: list[Generated | None]


def _merge(samples: list[Generated | None]) -> Generated:
    """One row from its per-sample answers; any failed sample fails the row (it is retried whole on resume)."""
    for s in samples:
        if s is not None and s.error is not None:
            return Generated(prompt_tokens=s.prompt_tokens, error=s.error)
    done = [s for s in samples if s is not None]
    return Generated(
        generations=[s.generations[0] for s in done],
        finish_reasons=[s.finish_reasons[0] for s in done],
        prompt_tokens=next((s.prompt_tokens for s in done if s.prompt_tokens is not None), None),
        completion_tokens=[s.completion_tokens[0] for s in done],
    )
