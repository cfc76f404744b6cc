"""`openr1-jax serve`: an OpenAI-compatible HTTP server over the generation Engine.

    handle = start_server(engine, port=0, model_name="my-model")     # tests, notebooks, other jobs
    client = openai.OpenAI(base_url=handle.url, api_key="x")
    client.chat.completions.create(model="my-model", messages=[...], stream=True)
    handle.close()

Routes: GET /v1/models, GET /v1/models/{name}, GET /health, POST /v1/completions, POST /v1/chat/completions
(non-streaming JSON or Server-Sent Events). The pieces, one file each: request validation (server_requests),
response/chunk building (server_responses), the one engine thread that batches concurrent requests
(server_batcher), the config (server_config). This file is only HTTP.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from openr1_jax.errors import UserError
from openr1_jax.generate.server_batcher import Batcher, Job
from openr1_jax.generate.server_config import ServeConfig, load_serve_config
from openr1_jax.generate.server_requests import APIError, parse_chat, parse_completion
from openr1_jax.generate.server_responses import StreamChunks, new_id, response_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20
_POLL_S = 1.0  # how often a waiting handler checks that the engine thread is still alive


class ServerHandle:
    """A running server: `.url` (ends in /v1, what OpenAI clients take as base_url), `.close()`."""

    def __init__(self, httpd: _HTTPServer, engine: Any, model_name: str, batcher: Batcher) -> None:
        self.httpd, self.engine, self.model_name, self.batcher = httpd, engine, model_name, batcher
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/v1"
        self._thread = threading.Thread(target=httpd.serve_forever, name="openr1-http", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt here)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def close(self) -> None:
        self.httpd.shutdown()  # stop accepting; open streams still finish or fail cleanly
        self.batcher.close()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    model_name: str = "openr1-jax",
    max_batch_size: int | None = None,
    batch_wait_ms: float = 5.0,
) -> ServerHandle:
    """Serve `engine` in background threads; port 0 picks a free port (read it from `handle.url`)."""
    return _start(_bind(host, port), engine, model_name, max_batch_size, batch_wait_ms)


def serve(cfg: ServeConfig) -> None:
    """Load the model, serve it until Ctrl-C. The port is taken before the (slow) model load, so a busy port
    fails at once."""
    path = Path(cfg.model).expanduser()
    if not path.exists():
        raise UserError(f"model '{cfg.model}' does not exist: train one with `openr1-jax sft` or set model=PATH")
    httpd = _bind(cfg.host, cfg.port)
    try:
        from openr1_jax.generate import Engine

        log.info("loading %s", cfg.model)
        engine = Engine.from_pretrained(
            str(path),
            tokenizer=cfg.tokenizer,
            dtype=cfg.dtype,
            model_overrides=cfg.model_overrides,
            max_batch_size=cfg.max_batch_size,
            max_seq_len=cfg.max_seq_len,
        )
        handle = _start(httpd, engine, cfg.model_name, cfg.max_batch_size, cfg.batch_wait_ms)
    except BaseException:
        httpd.server_close()
        raise
    print(f"serving '{cfg.model_name}' at {handle.url} (OpenAI API; Ctrl-C to stop)", flush=True)
    try:
        handle.wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        handle.close()


# ----------------------------------------------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: bursts of parallel clients (generate jobs) are the normal load
    engine: Any = None
    model_name: str = ""
    batcher: Batcher | None = None
    created: int = 0


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _bind(host: str, port: int) -> _HTTPServer:
    try:
        return (_HTTPServer6 if ":" in host else _HTTPServer)((host, port), _Handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: stop the other server or set port=N") from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def _start(
    httpd: _HTTPServer, engine: Any, model_name: str, max_batch_size: int | None, batch_wait_ms: float
) -> ServerHandle:
    batch = max_batch_size or getattr(engine, "max_batch_size", 32)
    httpd.engine, httpd.model_name, httpd.created = engine, model_name, int(time.time())
    httpd.batcher = Batcher(engine, batch, batch_wait_ms / 1000.0)
    return ServerHandle(httpd, engine, model_name, httpd.batcher)


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    server_version = "openr1-jax"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- routes -------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/health":
            self._json(200, {"status": "ok"})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/") and unquote(path[len("/v1/models/") :]) == self.server.model_name:
            self._json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            name = unquote(path[len("/v1/models/") :])
            self._error(APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found"))
        else:
            self._not_found()

    def do_POST(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        parse = {"/v1/completions": parse_completion, "/v1/chat/completions": parse_chat}.get(path)
        try:
            raw = self._read_body()
            if parse is None:
                self._not_found()
                return
            request = parse(_json_body(raw), self.server.engine, self.server.model_name)
            job = self.server.batcher.submit(request)
        except APIError as err:
            self._error(err)
            return
        except Exception as err:
            log.exception("could not prepare %s", path)
            self._error(APIError(500, f"{type(err).__name__}: {err}"))
            return
        rid = new_id(request)
        if request.stream:
            self._stream(job, rid)
        else:
            self._answer(job, rid)

    def _model_card(self) -> dict[str, Any]:
        card = {"id": self.server.model_name, "object": "model", "created": self.server.created}
        card |= {"owned_by": "openr1-jax", "max_model_len": self.server.engine.max_seq_len}
        return card

    def _not_found(self) -> None:
        self._error(APIError(404, f"no route {self.command} {urlsplit(self.path).path}", code="not_found"))

    # -- request ------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True  # the body's end is unknown: do not reuse the connection
            raise APIError(411, "the request needs a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, f"Content-Length '{length}' is not a number") from None
        if size > MAX_BODY_BYTES:
            self.close_connection = True
            raise APIError(413, f"the request body ({size} bytes) exceeds {MAX_BODY_BYTES} bytes")
        return self.rfile.read(size)

    def _next_event(self, job: Job) -> tuple:
        while True:
            try:
                return job.events.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.server.batcher.alive:
                    return ("error", 503, "the server is shutting down")

    # -- responses ----------------------------------------------------------------------------------------
    def _answer(self, job: Job, rid: str) -> None:
        while True:
            event = self._next_event(job)
            if event[0] == "done":
                tokenizer = self.server.engine.tokenizer
                self._json(200, response_body(job.request, event[1], rid, self.server.model_name, tokenizer))
                return
            if event[0] == "error":
                self._error(APIError(event[1], event[2]))
                return

    def _stream(self, job: Job, rid: str) -> None:
        chunks = StreamChunks(job.request, rid, self.server.model_name)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks.start():
                self._event(chunk)
            while True:
                event = self._next_event(job)
                if event[0] == "delta":
                    self._event(chunks.delta(event[1], event[2]))
                    continue
                if event[0] == "done":
                    for chunk in chunks.finish(event[1], self.server.engine.tokenizer):
                        self._event(chunk)
                else:  # an error after the 200 went out: OpenAI clients raise on an `error` event
                    self._event(APIError(event[1], event[2]).body())
                break
            self._event("[DONE]")
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            log.info("client of %s went away mid-stream", rid)  # the engine finishes the batch regardless
            self.close_connection = True

    def _event(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        self._write_chunk(f"data: {text}\n\n".encode())

    def _write_chunk(self, payload: bytes) -> None:
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, obj: Any) -> None:
        payload = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, err: APIError) -> None:
        self._json(err.status, err.body())


__all__ = ["ServeConfig", "ServerHandle", "load_serve_config", "serve", "start_server"]
