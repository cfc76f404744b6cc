"""OpenAI request bodies -> validated generation requests (token ids + SamplingParams), or an `APIError`.

Everything a client can get wrong is caught here, in the HTTP handler's thread, so a bad request is answered
with a 400 before it reaches the engine and never disturbs the batch it would have joined. Parameters the
engine does not implement (echo, penalties, logit_bias, tools, more than the sampled token's log-probability)
are refused when set to anything but their neutral value, rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from openr1_jax.errors import UserError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 128
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """One HTTP request, ready for the engine: `prompts` (token ids) all share `params`."""

    kind: Literal["completion", "chat"]
    prompts: list[list[int]]
    params: Any  # SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    logprobs: bool  # report the sampled tokens' log-probabilities
    top_logprobs: int  # 0 or 1: also list the sampled token under top_logprobs

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.params.n


def parse_completion(body: Any, engine: Any, model_name: str) -> GenerationRequest:
    body = _body(body, model_name)
    _refuse_unsupported(body, echo=False, suffix=None)
    prompts = _prompts(body.get("prompt"), engine)
    logprobs = _opt_int(body, "logprobs", 0, None)
    if logprobs is not None and logprobs > 1:
        raise APIError(
            400,
            f"logprobs={logprobs} is not supported: only the sampled token's log-probability is available (use 0 or 1)",
            param="logprobs",
        )
    max_tokens = _opt_int(body, "max_tokens", 1, None)
    if max_tokens is None:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    best_of = _opt_int(body, "best_of", 1, None)
    n = _opt_int(body, "n", 1, MAX_N) or 1
    if best_of is not None and best_of != n:
        raise APIError(400, f"best_of={best_of} is not supported (only best_of equal to n)", param="best_of")
    params = _sampling_params(body, n, max_tokens, logprobs is not None)
    request = GenerationRequest(
        "completion", prompts, params, *_stream(body), logprobs is not None, min(logprobs or 0, 1)
    )
    _check_lengths(request, engine, "prompt")
    return request


def parse_chat(body: Any, engine: Any, model_name: str) -> GenerationRequest:
    body = _body(body, model_name)
    _refuse_unsupported(body, tools=None, functions=None, parallel_tool_calls=None)
    if body.get("tool_choice") not in (None, "none"):
        raise APIError(400, "tool_choice is not supported (tools are not implemented)", param="tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format other than {'type': 'text'} is not supported", param="response_format")
    messages = _messages(body.get("messages"))
    try:
        text = engine.chat_prompt(messages)
    except (UserError, ValueError, TypeError, KeyError) as err:
        raise APIError(400, f"messages cannot be rendered with the chat template: {err}", param="messages") from None
    prompt = engine.encode(text)
    logprobs = _opt_bool(body, "logprobs", False)
    top_logprobs = _opt_int(body, "top_logprobs", 0, None) or 0
    if top_logprobs > 1:
        raise APIError(
            400,
            f"top_logprobs={top_logprobs} is not supported: only the sampled token's log-probability is available "
            "(use 0 or 1)",
            param="top_logprobs",
        )
    if top_logprobs and not logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    n = _opt_int(body, "n", 1, MAX_N) or 1
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _opt_int(body, key, 1, None)
    if max_tokens is None:  # like vLLM: whatever the context leaves
        max_tokens = max(engine.max_seq_len - len(prompt), 1)
    params = _sampling_params(body, n, max_tokens, logprobs)
    request = GenerationRequest("chat", [prompt], params, *_stream(body), logprobs, top_logprobs)
    _check_lengths(request, engine, "messages")
    return request


# ----------------------------------------------------------------------------------------------------------
def _body(body: Any, model_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist: this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    return body


def _refuse_unsupported(body: dict[str, Any], **neutral: Any) -> None:
    neutral |= {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": None}
    neutral |= {"min_tokens": 0, "use_beam_search": False}
    for key, value in neutral.items():
        got = body.get(key)
        if got is None or got == value or (key == "logit_bias" and got == {}) or (key == "suffix" and got == ""):
            continue
        raise APIError(400, f"{key}={got!r} is not supported by this server", param=key)


def _prompts(prompt: Any, engine: Any) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of such lists."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        items = prompt
    else:
        raise APIError(
            400, "prompt must be a string, a list of strings, or token ids (a list of ints or of lists)", param="prompt"
        )
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = engine.encode(item)
        elif all(_is_int(t) for t in item):
            ids = [int(t) for t in item]  # the engine's check_prompt bounds them by the vocabulary
        else:
            raise APIError(400, f"prompt {i} must be a string or a list of token ids", param="prompt")
        if not ids:
            raise APIError(400, f"prompt {i} is empty", param="prompt")
        out.append(ids)
    return out


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _CHAT_ROLES:
            raise APIError(
                400, f"messages[{i}] must be an object whose role is one of {', '.join(_CHAT_ROLES)}", param="messages"
            )
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can be rendered
            texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not all(isinstance(t, str) for t in texts):
                raise APIError(400, f"messages[{i}].content may only hold text parts", param="messages")
            content = "".join(texts)
        if content is None and message["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for system
        out.append({"role": role, "content": content})
    return out


def _sampling_params(body: dict[str, Any], n: int, max_tokens: int, logprobs: bool) -> Any:
    from openr1_jax.generate.sampling import SamplingParams

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of them", param="stop")
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in stop_token_ids):
        raise APIError(400, "stop_token_ids must be a list of token ids", param="stop_token_ids")
    top_k = _opt_int(body, "top_k", -1, None)
    seed = _opt_int(body, "seed", None, None)
    kwargs = {
        "max_new_tokens": max_tokens,
        "temperature": _opt_float(body, "temperature", 0.0, None, 1.0),
        "top_p": _opt_float(body, "top_p", 0.0, 1.0, 1.0),
        "top_k": -1 if top_k in (None, 0) else top_k,  # vLLM: 0 and -1 both mean off
        "min_p": _opt_float(body, "min_p", 0.0, 1.0, 0.0),
        "n": n,
        "seed": None if seed is None else seed % 2**32,  # the engine's PRNG takes uint32 seeds
        "stop": tuple(stop),
        "stop_token_ids": tuple(int(t) for t in stop_token_ids),
        "logprobs": logprobs,
    }
    if kwargs["top_p"] == 0.0:
        raise APIError(400, "top_p must be in (0, 1]", param="top_p")
    try:
        return SamplingParams(**kwargs)
    except (UserError, ValueError, TypeError) as err:
        raise APIError(400, str(err)) from None


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {'include_usage': true}", param="stream_options")
    if not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return stream, bool(options.get("include_usage", False))


def _check_lengths(request: GenerationRequest, engine: Any, param: str) -> None:
    for i, ids in enumerate(request.prompts):
        reason = engine.check_prompt(ids, request.params)
        if reason is None:
            continue
        where = f"prompt {i}: " if len(request.prompts) > 1 else ""
        asked = len(ids) + request.params.max_new_tokens
        if asked > engine.max_seq_len:  # OpenAI's wording and code, which clients look for
            reason = (
                f"this model's maximum context length is {engine.max_seq_len} tokens, but {asked} were requested "
                f"({len(ids)} in the {param} + {request.params.max_new_tokens} to generate): shorten the {param} "
                "or lower max_tokens"
            )
            raise APIError(400, where + reason, param=param, code="context_length_exceeded")
        raise APIError(400, where + reason, param=param)


# ----------------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(body: dict[str, Any], key: str, lo: int | None, hi: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
        raise APIError(400, f"{key} must be an integer{bounds if lo is not None else ''}, not {value!r}", param=key)
    return value


def _opt_float(body: dict[str, Any], key: str, lo: float, hi: float | None, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise APIError(400, f"{key} must be a number, not {value!r}", param=key)
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(400, f"{key} must be {bounds}, not {value!r}", param=key)
    return float(value)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, not {value!r}", param=key)
    return value
