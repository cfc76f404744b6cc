"""The OpenAI-compatible server, driven by the real `openai` client against a real Engine on a tiny random MoE.

One server (and engine) for the module; every test uses max_tokens 8 so the jitted shapes are shared."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import openai
import pytest

from openr1_jax.errors import UserError
from openr1_jax.generate.server import load_serve_config, serve, start_server

MODEL = "tiny-server"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from openr1_jax.convert.checkpoint import save_model
    from openr1_jax.data import embedded
    from openr1_jax.models.params import build_model
    from openr1_jax.models.presets import load_preset

    path = tmp_path_factory.mktemp("server") / "model"
    save_model(build_model(load_preset("tiny-moe").replace(vocab_size=512)), path)
    AutoTokenizer.from_pretrained(str(embedded.TOKENIZER_DIR)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    from openr1_jax.generate import Engine

    # chunk_size 4: an 8-token answer streams in several deltas.
    return Engine.from_pretrained(model_dir, max_batch_size=8, max_seq_len=64, chunk_size=4)


@pytest.fixture(scope="module")
def server(engine):
    # A 100 ms batching window: concurrent test requests reliably land in one batch.
    handle = start_server(engine, model_name=MODEL, batch_wait_ms=100)
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def _complete(client, prompt="1+2=", **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0} | kw  # greedy unless a test says otherwise
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def _chat(client, content="What is 1+2?", **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0} | kw
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# ----------------------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")


def test_completion_matches_the_engine(client, engine):
    from openr1_jax.generate import SamplingParams

    out = _complete(client, logprobs=1)
    direct = engine.generate(["1+2="], SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0))[0].outputs[0]
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert choice.text == direct.text and choice.finish_reason == direct.finish_reason
    n_prompt = len(engine.encode("1+2="))
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == len(direct.token_ids)
    assert out.usage.total_tokens == n_prompt + len(direct.token_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(direct.token_ids)
    assert lp.token_logprobs == pytest.approx(direct.logprobs, abs=1e-5)
    assert all(v <= 0 for v in lp.token_logprobs)
    # The same prompt as token ids gives the same answer.
    assert _complete(client, prompt=engine.encode("1+2=")).choices[0].text == direct.text


def test_completion_stream_equals_the_non_streamed_text(client):
    full = _complete(client).choices[0]
    chunks = list(_complete(client, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == full.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_and_its_stream(client):
    full = _chat(client, logprobs=True)
    (choice,) = full.choices
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert len(choice.logprobs.content) == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == choice.message.content
    assert sum(1 for piece in content if piece) >= 2  # deltas arrive as decoding goes, not all at the end
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_several_prompts_and_samples(client):
    kw = dict(prompt=["1+2=", "3+4="], n=2, temperature=1.0, seed=7)
    out = _complete(client, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 4 * MAX_TOKENS or any(c.finish_reason == "stop" for c in out.choices)
    again = _complete(client, **kw)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded: reproducible

    chat = _chat(client, n=2, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_string_cuts_the_text(client):
    text = _complete(client).choices[0].text
    at = next((i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.strip()), None)
    if at is None:
        pytest.skip(f"the random model's answer {text!r} has no ASCII character to stop on")
    stop = text[at]
    out = _complete(client, stop=[stop]).choices[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"
    streamed = list(_complete(client, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == out.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_share_engine_calls(client, engine, monkeypatch):
    prompts = [f"{i}+{2 * i}=" for i in range(4)]
    sequential = [_complete(client, prompt=p).choices[0].text for p in prompts]
    chat_alone = _chat(client).choices[0].message.content

    calls = []
    real_generate = engine.generate

    def counted(prompts, params, **kw):
        calls.append(len(prompts))
        return real_generate(prompts, params, **kw)

    monkeypatch.setattr(engine, "generate", counted)
    results: list = [None] * len(prompts)
    stream_chat: list = []

    def ask(i):
        results[i] = _complete(client, prompt=prompts[i]).choices[0].text

    def ask_stream():
        stream_chat.append("".join(c.choices[0].delta.content or "" for c in _chat(client, stream=True) if c.choices))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=ask_stream))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential  # greedy: batching does not change answers
    assert stream_chat == [chat_alone]
    assert len(calls) < len(threads) and sum(calls) == len(threads), calls


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(max_tokens=100), "prompt"),  # prompt + 100 > max_seq_len 64
        (dict(temperature=-1), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(logprobs=5), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(extra_body={"top_k": -3}), "top_k"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(prompt=[[1, 2, 100000]]), "prompt"),
        (dict(prompt=[]), "prompt"),
    ],
)
def test_bad_completion_requests_get_400(client, kw, param):
    request = {"model": MODEL, "prompt": "1+2=", "max_tokens": MAX_TOKENS} | kw
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**request)
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"]
    if "max_tokens" in kw:
        assert body["code"] == "context_length_exceeded" and "64" in body["message"]


def test_bad_chat_requests_get_400(client):
    for kw in (dict(messages=[]), dict(messages=[{"role": "robot", "content": "hi"}]), dict(top_logprobs=3)):
        request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS} | kw
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**request)
    with pytest.raises(
        openai.BadRequestError, match="maximum context length is 64"
    ):  # max_tokens too large for the context
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=64)


def _http(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, "/v1" + path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_unknown_routes_models_and_bad_json(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)  # one keep-alive connection
    try:
        for method, path in (("GET", "/nope"), ("POST", "/chat/nope")):
            status, body = _http(conn, method, path, b"{}" if method == "POST" else None)
            assert status == 404 and body["error"]["message"]
        status, body = _http(conn, "POST", "/completions", json.dumps({"model": "other", "prompt": "x"}).encode())
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = _http(conn, "POST", "/completions", b"{not json")
        assert status == 400 and "JSON" in body["error"]["message"]
        status, body = _http(conn, "POST", "/completions", b'["a list"]')
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        status, body = _http(conn, "GET", "/models")  # the connection still works after the errors
        assert status == 200 and body["data"][0]["id"] == MODEL
    finally:
        conn.close()


def test_engine_failure_is_500_for_its_request_only(client, engine, monkeypatch):
    poison = engine.encode("9+9=")
    real_generate = engine.generate

    batches = []

    def failing(prompts, params, **kw):
        batches.append(len(prompts))
        if any(list(p) == poison for p in prompts):
            raise RuntimeError("injected device failure")
        return real_generate(prompts, params, **kw)

    expected = _complete(client, prompt="1+2=").choices[0].text
    monkeypatch.setattr(engine, "generate", failing)
    outcome: dict = {}

    def good():
        outcome["good"] = _complete(client, prompt="1+2=").choices[0].text

    def bad():
        try:
            _complete(client, prompt="9+9=")
        except openai.InternalServerError as err:
            outcome["bad"] = err.body

    threads = [threading.Thread(target=good), threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batches[0] == 2 and sorted(batches[1:3]) == [1, 1], batches  # one batch, then each request alone
    assert outcome["good"] == expected  # its batch failed, it was retried alone
    assert outcome["bad"]["type"] == "server_error" and "injected device failure" in outcome["bad"]["message"]
    with pytest.raises(openai.APIError, match="injected"):  # mid-stream errors arrive as an error event
        list(_complete(client, prompt="9+9=", stream=True))
    assert _complete(client, prompt="1+2=").choices[0].text == expected  # still serving


# ----------------------------------------------------------------------------------------------------------
def test_serve_config(tmp_path):
    cfg = load_serve_config("default")
    assert (cfg.host, cfg.port, cfg.model_name) == ("127.0.0.1", 8000, cfg.model)
    cfg = load_serve_config(None, ["model=some/dir", "served_model_name=m", "port=0", "batch_wait_ms=2"])
    assert (cfg.model, cfg.model_name, cfg.port, cfg.batch_wait_ms) == ("some/dir", "m", 0, 2.0)
    with pytest.raises(UserError, match="did you mean 'max_batch_size'"):
        load_serve_config(None, ["max_batch=4"])
    with pytest.raises(UserError, match="port"):
        load_serve_config(None, ["port=70000"])
    with pytest.raises(UserError, match="does not exist"):
        serve(load_serve_config(None, [f"model={tmp_path / 'missing'}"]))


def test_busy_port_is_a_user_error(engine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="already in use"):
            start_server(engine, port=busy.getsockname()[1])


def test_serve_runs_until_ctrl_c(model_dir):
    """`serve(cfg)` in its own process: prints the URL, answers, and exits cleanly on SIGINT."""
    code = (  # Python's SIGINT handler as in a terminal, even when pytest runs with SIGINT ignored (in background)
        "import sys, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from openr1_jax.generate.server import serve, load_serve_config; "
        "serve(load_serve_config(None, sys.argv[1:]))"
    )
    args = [f"model={model_dir}", "port=0", "served_model_name=cli", "max_seq_len=64"]
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'cli' at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url + "/models", timeout=60) as response:
            models = json.loads(response.read())
        assert models["data"][0]["id"] == "cli" and models["data"][0]["max_model_len"] == 64
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
