"""The endpoint backend when the server fails: refused connections, a server that accepts and never answers,
5xx/429 answers (retried) and 4xx answers (not retried). Real local sockets, short timeouts; every failure
becomes the row's error record, and a run where every row failed ends in a UserError naming the reason."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from openr1_jax.errors import UserError
from openr1_jax.generate.config import load_generate_config
from openr1_jax.generate.run import run_generate

ROWS = 3
N = 2
RETRIES = 1


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i} + 1?"}) + "\n" for i in range(ROWS)))
    return path


def _cfg(tmp_path, data, url, *overrides):
    return load_generate_config(
        "default",
        [
            "backend=openai",
            f"openai.base_url={url}",
            "openai.model=m",
            f"openai.max_retries={RETRIES}",
            "openai.backoff_s=0.01",
            "openai.timeout_s=0.5",
            f"dataset.path={data}",
            "dataset.id_column=null",
            "dataset.max_examples=null",
            "filters.math_verify=false",
            f"num_generations={N}",
            f"output_path={tmp_path / 'out.jsonl'}",
            "progress=false",
            *overrides,
        ],
    )


def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stalling_server():
    """Accepts connections and never answers; counts them."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", accepted
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def _status_server(status: int, message: str):
    """Answers every POST with `status` and an OpenAI-shaped error body; counts requests."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            body = json.dumps({"error": {"message": message, "type": "x"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, hits


def _assert_all_failed(tmp_path, err, reason):
    assert f"all {ROWS} rows failed" in str(err.value) and reason in str(err.value)
    records = _records(tmp_path)
    assert sorted(r["id"] for r in records) == list(range(ROWS))
    for r in records:
        assert reason in r["error"] and r["generations"] == [] and r["prompt"].startswith("What is")


def test_connection_refused_is_an_error_record_per_row(tmp_path, data):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(UserError) as err:
        run_generate(_cfg(tmp_path, data, url))
    _assert_all_failed(tmp_path, err, f"failed after {RETRIES + 1} attempts: connection refused")


def test_a_server_that_never_answers_times_out(tmp_path, data, stalling_server):
    url, accepted = stalling_server
    with pytest.raises(UserError) as err:
        run_generate(_cfg(tmp_path, data, url))
    _assert_all_failed(tmp_path, err, "no answer within 0.5 s")
    assert len(accepted) == ROWS * N * (RETRIES + 1)  # every sample request, every attempt


@pytest.mark.parametrize("status, attempts", [(503, RETRIES + 1), (429, RETRIES + 1), (400, 1)])
def test_server_errors_are_retried_unless_asking_again_cannot_help(tmp_path, data, status, attempts):
    httpd, hits = _status_server(status, "the reason from the server")
    try:
        with pytest.raises(UserError) as err:
            run_generate(_cfg(tmp_path, data, f"http://127.0.0.1:{httpd.server_address[1]}/v1"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    _assert_all_failed(tmp_path, err, f"HTTP {status}: the reason from the server")
    assert len(hits) == ROWS * N * attempts and set(hits) == {"/v1/chat/completions"}


def test_an_unreachable_server_without_a_model_name_stops_before_writing(tmp_path, data):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(UserError, match=r"cannot learn the model name from .*/models .*connection refused.*set openai"):
        run_generate(_cfg(tmp_path, data, url, "openai.model=null"))
    assert not (tmp_path / "out.jsonl").exists()
