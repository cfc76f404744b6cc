"""Engine outputs -> OpenAI response bodies and Server-Sent-Event chunks (`text_completion`, `chat.completion`,
`chat.completion.chunk`). Choice `index` = prompt index * n + sample index, as in OpenAI's API."""

from __future__ import annotations

import time
import uuid
from typing import Any

from openr1_jax.generate.server_requests import GenerationRequest


def new_id(request: GenerationRequest) -> str:
    return ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(request: GenerationRequest, outputs: list[Any]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in request.prompts)  # each prompt counts once however large n is
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_body(request: GenerationRequest, outputs: list[Any], rid: str, model: str, tokenizer: Any) -> dict:
    """The non-streaming answer to `request` from its engine outputs (one RequestOutput per prompt)."""
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            choice: dict[str, Any] = {"index": i * request.params.n + c.index}
            if request.kind == "chat":
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choice["logprobs"] = _logprobs(request, c, tokenizer)
            choice["finish_reason"] = c.finish_reason
            choices.append(choice)
    obj = "chat.completion" if request.kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(request, outputs),
    }


class StreamChunks:
    """The chunks of one streamed response: `start()`, a `delta()` per engine text update, then `finish()`.

    `finish` closes every choice with its finish_reason (and log-probabilities, known only once the engine
    returns); any text the deltas did not cover (e.g. held back while it could still become a stop string) is
    sent first, so the concatenated deltas always equal the non-streaming text."""

    def __init__(self, request: GenerationRequest, rid: str, model: str) -> None:
        self.request, self.rid, self.model = request, rid, model
        self.created = int(time.time())
        self.sent: dict[int, str] = {}

    def start(self) -> list[dict]:
        if self.request.kind != "chat":
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(self._num_choices())]

    def delta(self, choice: int, text: str) -> dict:
        self.sent[choice] = self.sent.get(choice, "") + text
        return self._chunk(choice, {"content": text} if self.request.kind == "chat" else text)

    def finish(self, outputs: list[Any], tokenizer: Any) -> list[dict]:
        chunks = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                choice = i * self.request.params.n + c.index
                sent = self.sent.get(choice, "")
                rest = c.text[len(sent) :] if c.text.startswith(sent) else ""
                if rest:
                    chunks.append(self.delta(choice, rest))
                final = self._chunk(choice, {} if self.request.kind == "chat" else "", c.finish_reason)
                final["choices"][0]["logprobs"] = _logprobs(self.request, c, tokenizer)
                chunks.append(final)
        if self.request.include_usage:
            chunks.append(self._envelope([]) | {"usage": usage(self.request, outputs)})
        return chunks

    def _num_choices(self) -> int:
        return len(self.request.prompts) * self.request.params.n

    def _chunk(self, choice: int, delta: Any, finish_reason: str | None = None) -> dict:
        body: dict[str, Any] = {"index": choice}
        if self.request.kind == "chat":
            body["delta"] = delta
        else:
            body["text"] = delta
        body["logprobs"] = None
        body["finish_reason"] = finish_reason
        return self._envelope([body])

    def _envelope(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.request.kind == "chat" else "text_completion"
        chunk = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return chunk


def _logprobs(request: GenerationRequest, completion: Any, tokenizer: Any) -> dict | None:
    """Log-probabilities of the sampled tokens (EOS / stop token included), in the endpoint's schema."""
    if not request.logprobs or completion.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in completion.token_ids]
    values = [float(v) for v in completion.logprobs]
    if request.kind == "chat":
        content = []
        for token, value in zip(tokens, values, strict=True):
            entry = {"token": token, "logprob": value, "bytes": list(token.encode("utf-8"))}
            top = [dict(entry)] if request.top_logprobs else []
            content.append(entry | {"top_logprobs": top})
        return {"content": content}
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = [{t: v} for t, v in zip(tokens, values, strict=True)] if request.top_logprobs else None
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}
