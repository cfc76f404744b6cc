"""A small client for OpenAI-compatible servers (vLLM, SGLang, `openr1-jax serve`): stdlib only, thread-safe.

Each call retries connection errors, timeouts, 429 and 5xx answers with exponential backoff (honouring
Retry-After), and gives up with `RequestFailed` naming the last reason. Other 4xx answers (a prompt longer than
the server's context, an unknown model) are not retried: asking again cannot help.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import urllib.error
import urllib.request
from typing import Any

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 60.0


class RequestFailed(Exception):
    """A request that failed for good; the message is the reason a user reads in the row's error record."""


class OpenAIClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._closed = threading.Event()  # set by close(): sleeping retries stop waiting

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> dict[str, Any]:
        return self._call("GET", path, None)

    def close(self) -> None:
        self._closed.set()

    # ------------------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after = None
            try:
                return self._once(method, url, data)
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code}: {_error_message(err)}"
                if err.code not in _RETRY_STATUS:
                    raise RequestFailed(f"{method} {url} failed: {reason}") from None
                retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except TimeoutError:
                reason = f"no answer within {self.timeout_s:g} s"
            except urllib.error.URLError as err:
                reason = _connection_reason(err.reason, self.timeout_s)
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                reason = _connection_reason(err, self.timeout_s)
            except ValueError as err:  # a 200 answer that is not JSON
                raise RequestFailed(f"{method} {url} answered with something that is not JSON: {err}") from None
            if attempt + 1 == attempts or self._closed.is_set():
                break
            wait = min(_MAX_BACKOFF_S, self.backoff_s * 2**attempt) * (1 + 0.25 * random.random())
            if self._closed.wait(retry_after if retry_after is not None else wait):
                break
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise RequestFailed(f"{method} {url} failed after {tries}: {reason}")

    def _once(self, method: str, url: str, data: bytes | None) -> dict[str, Any]:
        request = urllib.request.Request(url, data=data, headers=self._headers, method=method)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = response.read()
        answer = json.loads(payload)
        if not isinstance(answer, dict):
            raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
        return answer


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI's {"error": {"message": ...}}, vLLM's {"message": ...}, or the text."""
    try:
        text = err.read().decode("utf-8", "replace")
    except Exception:
        return err.reason or "no message"
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500] or (err.reason or "no message")
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        for key in ("message", "detail", "error"):
            if isinstance(body.get(key), str):
                return body[key][:500]
    return text.strip()[:500]


def _connection_reason(err: BaseException | str, timeout_s: float) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(err, TimeoutError | socket.timeout):
        return f"no answer within {timeout_s:g} s"
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err})"
    return str(err) or type(err).__name__


def _retry_after(value: str | None) -> float | None:
    try:
        return min(_MAX_BACKOFF_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None
