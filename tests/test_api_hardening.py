"""The API under abuse: failing and abandoned streams, oversized and malformed
bodies, prompts over the context, foreign Host headers, OpenAI's parameters.

Most checks run against one real daemon (a subprocess on 127.0.0.1, the tiny
model, the real `openai` client), started once for the module; the token and
shutdown checks have a daemon of their own. A generation that fails cannot be
provoked from outside once every known cause is a 400, so that path is
checked in-process, on the same app, with a model that raises.
"""

import errno
import http.client
import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from conftest import DAEMON_SECTIONS, write_config
from test_daemon import Daemon, free_port

from seal_agent.errors import SealError
from seal_agent.model.generation import Sampling, TextStream
from seal_agent.model.loader import load_model, load_tokenizer
from seal_agent.service.api.app import build_app
from seal_agent.service.api.protocol import MAX_CHOICES
from seal_agent.service.serving import Served, ServingOnly

DAEMON_CONFIG = DAEMON_SECTIONS + """[api]
max_tokens = 2000  # long enough generations to tell a stopped one from one left running
"""
CONTEXT = 2048  # the tiny model's max_position_embeddings
LIMIT = 20_000_000  # api.max_request_bytes, the default


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    """One daemon without a token, shared by the tests that leave it running."""
    tmp = tmp_path_factory.mktemp("api")
    cfg = write_config(tmp / "config.toml", tiny_model_dir, tmp / "state", extra=DAEMON_CONFIG)
    d = Daemon(cfg, free_port(), "--inbox", str(tmp / "inbox"))
    try:
        d.wait_up()
        yield d
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


def client(d: Daemon, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{d.url}/v1", api_key=d.token or "x", max_retries=0, **kwargs)


def assert_openai_error(r: httpx.Response, status: int | None = None, param=..., code=...) -> dict:
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str), e
    assert e["param"] is None or (isinstance(e["param"], str) and not e["param"].isdigit()), e
    assert e["code"] is None or isinstance(e["code"], str), e
    if status is not None:
        assert r.status_code == status, (r.status_code, e)
    if param is not ...:
        assert e["param"] == param, e
    if code is not ...:
        assert e["code"] == code, e
    return e


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def wait_for_log(d: Daemon, pattern: str, timeout: float = 10) -> re.Match | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, d.log.read_text()):
            return m
        time.sleep(0.1)
    return None


# -- a generation that fails (in-process) --------------------------------------

@pytest.fixture
def app_with(tiny_cfg, tiny_model_dir):
    """The app on an in-process Served behind a serving-only backend (no daemon), under
    uvicorn on 127.0.0.1 as bench.query_latency runs it: a request that hangs fails on
    its client's timeout."""
    served = Served(load_model(tiny_model_dir, tiny_cfg), load_tokenizer(tiny_model_dir), 0)
    backend = ServingOnly(tiny_cfg.api, served)
    server = uvicorn.Server(uvicorn.Config(build_app(backend), host="127.0.0.1", port=free_port(), log_level="error",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield served, backend, f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_failing_generation_ends_its_stream_with_an_error_and_frees_the_model(app_with, monkeypatch):
    served, _daemon, url = app_with

    def broken(*args, **kwargs):
        raise RuntimeError("cannot reshape tensor of 0 elements")

    monkeypatch.setattr(served.model, "generate", broken)
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=20)
    with pytest.raises(openai.APIError, match="generation failed"):
        list(oai.completions.create(model="seal-agent", prompt="Hi", max_tokens=5, stream=True))
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "stream": True}, timeout=20)
    events = sse_events(r.text)
    assert events[-1]["error"]["type"] == "server_error" and "reshape" in events[-1]["error"]["message"]
    assert "[DONE]" not in events
    assert served._generate.acquire(timeout=5)  # the model is free again
    served._generate.release()
    monkeypatch.undo()
    chunks = list(oai.completions.create(model="seal-agent", prompt="Hi", max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_cancelled_stream_gives_up_waiting_for_the_model(tiny_cfg, tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, tiny_cfg), load_tokenizer(tiny_model_dir)
    lock = threading.Lock()
    lock.acquire()  # another generation holds the model
    stream = TextStream(model, tokenizer, "Hi", Sampling(max_new_tokens=5), lock=lock, poll_s=0.05)
    pieces: list[str] = []
    reader = threading.Thread(target=lambda: pieces.extend(stream), daemon=True)
    reader.start()
    time.sleep(0.3)
    stream.cancel()
    reader.join(3)
    assert not reader.is_alive() and pieces == []
    lock.release()
    time.sleep(0.2)
    assert lock.acquire(blocking=False)  # the cancelled generation never took it
    assert stream.completion.tokens == 0


def test_unexpected_failures_are_json_500s_and_template_refusals_400s(app_with, monkeypatch):
    served, backend, url = app_with
    monkeypatch.setattr(served, "prepare", lambda prompt: 1 / 0)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=20)
    assert assert_openai_error(r, 500)["type"] == "server_error"
    monkeypatch.setattr(served.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=20)
    assert "roles must alternate" in assert_openai_error(r, 400, param="messages")["message"]

    # what storing an upload can raise: the file system refusing its name is the request's to fix
    def submitting(error: Exception):
        def submit(filename: str, data: bytes):
            raise error
        return submit

    upload = {"filename": "notes.md", "content": "x"}
    backend.submit = submitting(SealError("bad file name 'notes.md'"))
    assert "bad file name" in assert_openai_error(httpx.post(f"{url}/v1/documents", json=upload), 400)["message"]
    backend.submit = submitting(OSError(errno.ENAMETOOLONG, "File name too long"))
    assert_openai_error(httpx.post(f"{url}/v1/documents", json=upload), 400, param="filename")
    backend.submit = submitting(OSError(errno.ENOSPC, "No space left on device"))
    assert assert_openai_error(httpx.post(f"{url}/v1/documents", json=upload), 500)["type"] == "server_error"


def test_a_serving_only_backend_answers_and_refuses_the_rest_in_openai_shape(app_with):
    _served, _backend, url = app_with
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2}, timeout=20)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    upload = {"filename": "notes.md", "content": "x"}
    e = assert_openai_error(httpx.post(f"{url}/v1/documents", json=upload), 501, code="not_implemented")
    assert "learns no documents" in e["message"]
    assert_openai_error(httpx.get(f"{url}/v1/status"), 501, code="not_implemented")
    assert_openai_error(httpx.get(f"{url}/v1/jobs/1"), 404, code="not_found")


# -- an abandoned stream frees the model -----------------------------------------

def test_a_client_leaving_mid_stream_stops_its_generation(api):
    oai = client(api)
    prompt, n = "The Normans", 1900
    t0 = time.perf_counter()
    chunks = list(oai.completions.create(model="seal-agent", prompt=prompt, max_tokens=n, stream=True))
    full = time.perf_counter() - t0
    assert chunks[-1].choices[0].finish_reason == "length", "the tiny model must write all max_tokens here"
    assert full > 0.8, f"{n} tokens took {full:.2f} s: too fast to tell a stopped generation from a finished one"

    with httpx.Client(timeout=30) as h, h.stream("POST", f"{api.url}/v1/completions",
                                                 json={"prompt": prompt, "max_tokens": n, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    t0 = time.perf_counter()
    done = oai.completions.create(model="seal-agent", prompt="Hello", max_tokens=3)
    after = time.perf_counter() - t0
    assert done.choices[0].text is not None
    # left running, the abandoned generation would hold the model for about `full` seconds
    assert after < full / 3, f"the next answer took {after:.2f} s; a whole generation takes {full:.2f} s"
    m = wait_for_log(api, rf"generation cancelled after (\d+) of {n} tokens")
    assert m and int(m[1]) < n / 2, api.log.read_text()[-2000:]


# -- bodies bounded as they are read --------------------------------------------

def raw_request(port: int, head: str, chunks=(), timeout: float = 20) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, response.read()


def test_a_chunked_body_is_bounded_as_it_is_read(api):
    head = ("POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    start = b'{"filename": "big.txt", "content": "'
    mb = b"a" * 1_000_000
    body = [start] + [mb] * 19
    body.append(b"a" * (LIMIT + 1 - sum(map(len, body))))
    assert sum(map(len, body)) == LIMIT + 1 and body[-1]  # one byte over, then no end of the body:
    # a server that waits for the whole body before counting it never answers
    status, answer = raw_request(api.port, head, body)
    assert status == 413
    e = json.loads(answer)["error"]
    assert "20,000,000 bytes" in e["message"] and e["type"] == "invalid_request_error"

    # the Content-Length fast path: refused before a byte of the body is sent
    status, answer = raw_request(api.port, "POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                           "Content-Type: application/json\r\nContent-Length: 25000000\r\n\r\n")
    assert status == 413 and "20,000,000 bytes" in json.loads(answer)["error"]["message"]

    # a chunked body under the limit is read as any other
    small = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    r = httpx.post(f"{api.url}/v1/completions", content=iter([small[:5], small[5:]]),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200


# -- prompts over the context ---------------------------------------------------

def test_prompts_longer_than_the_context_are_refused(api):
    oai = client(api)
    long = "hello " * 3000  # about 3,000 tokens, over the 2,048 positions
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="seal-agent", prompt=long, max_tokens=5)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert re.match(rf"This model's maximum context length is {CONTEXT} tokens\. However, you requested \d+ tokens "
                    rf"\(\d+ in the prompt, 5 in the completion\)", err["message"]), err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="seal-agent", max_tokens=5, messages=[{"role": "user", "content": long}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"

    fits = "hello " * 1000
    n_prompt = oai.completions.create(model="seal-agent", prompt=fits, max_tokens=1).usage.prompt_tokens
    room = CONTEXT - n_prompt
    with pytest.raises(openai.BadRequestError, match=rf"{n_prompt} in the prompt, {room + 1} in the completion"):
        oai.completions.create(model="seal-agent", prompt=fits, max_tokens=room + 1)
    assert oai.completions.create(model="seal-agent", prompt=fits, max_tokens=2).usage.completion_tokens == 2
    # max_tokens left out: as many as fit, up to the default, rather than a refusal
    nearly = "hello " * (CONTEXT - 60)
    done = oai.completions.create(model="seal-agent", prompt=nearly, stop=["\x00never"])
    assert done.usage.total_tokens <= CONTEXT


# -- Host names without a token -------------------------------------------------

def test_without_a_token_only_loopback_host_names_are_answered(api):
    for host in ("evil.example", "evil.example:80", f"attacker.test:{api.port}", "10.0.0.1", "[2001:db8::1]:80",
                 "localhost.evil.example", "127.0.0.1.nip.io"):
        r = httpx.get(f"{api.url}/v1/models", headers={"Host": host}, timeout=5)
        assert "loopback" in assert_openai_error(r, 403, code="host_not_allowed")["message"], host
    r = httpx.post(f"{api.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                   headers={"Host": "rebound.example"}, timeout=5)
    assert_openai_error(r, 403)
    for host in ("localhost", f"localhost:{api.port}", "LOCALHOST", "127.0.0.1", f"127.0.0.1:{api.port}",
                 "127.5.6.7:1", f"[::1]:{api.port}", "[::1]"):
        r = httpx.get(f"{api.url}/v1/models", headers={"Host": host}, timeout=5)
        assert r.status_code == 200, (host, r.text)


# -- what used to be a plain-text 500 --------------------------------------------

def test_bad_values_are_400s_in_openai_shape(api):
    url = api.url

    def post(path: str, body: dict) -> httpx.Response:  # JSON's own escapes (httpx would write UTF-8)
        return httpx.post(f"{url}{path}", content=json.dumps(body), headers={"Content-Type": "application/json"},
                          timeout=30)

    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert_openai_error(r, 400, param="messages.0.content.0.text")
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert_openai_error(r, 400, param="messages.0.content.0.type")
    r = post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert_openai_error(r, 400, param="messages.0.role")
    assert_openai_error(post("/v1/completions", {"prompt": "a\ud800", "max_tokens": 2}), 400, param="prompt")
    r = post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "seed": 2**64})
    assert_openai_error(r, 400, param="seed")
    assert post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "seed": 2**64 - 1}).status_code == 200
    r = httpx.get(f"{url}/v1/jobs/99999999999999999999", timeout=10)
    assert_openai_error(r, 404, code="not_found")
    assert_openai_error(httpx.get(f"{url}/v1/jobs/abc", timeout=10), 400, param="job_id")
    r = post("/v1/documents", {"filename": "é" * 200 + ".txt", "content": "x"})
    assert_openai_error(r, 400)
    # an empty prompt starts from the start token, streamed or not
    oai = client(api)
    done = oai.completions.create(model="seal-agent", prompt="", max_tokens=3)
    assert done.usage.prompt_tokens == 1 and done.usage.completion_tokens == 3
    chunks = list(oai.completions.create(model="seal-agent", prompt="", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks).strip() == done.choices[0].text


# -- OpenAI's parameters ---------------------------------------------------------

def test_openai_parameters_are_honoured_or_refused(api):
    oai = client(api)
    ask = [{"role": "user", "content": "Hello"}]
    many = oai.chat.completions.create(model="seal-agent", messages=ask, max_tokens=3, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) == 1  # temperature 0: the same three times
    assert [c.finish_reason for c in many.choices] == ["length"] * 3 and many.usage.completion_tokens == 3 * 3
    with pytest.raises(openai.BadRequestError, match="n"):
        oai.chat.completions.create(model="seal-agent", messages=ask, max_tokens=3, n=2, stream=True)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="seal-agent", messages=ask, max_tokens=3, n=MAX_CHOICES + 1)

    # finish_reason and usage, streamed: length at max_tokens, usage in a last chunk without choices
    chunks = list(oai.chat.completions.create(model="seal-agent", messages=ask, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(oai.completions.create(model="seal-agent", prompt="The", max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].text for c in chunks)
    stop = text[len(text) // 2 :][:3]
    chunks = list(oai.completions.create(model="seal-agent", prompt="The", max_tokens=4, stream=True, stop=[stop]))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]

    # completion_tokens counts the tokens written, not the text written again
    for prompt in ("1 2 3", "def f(x):", "a", "Zorblax", "Paris is"):
        done = oai.completions.create(model="seal-agent", prompt=prompt, max_tokens=3)
        assert done.usage.completion_tokens <= 3, (prompt, done)

    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

    r = httpx.post(f"{api.url}/v1/completions", content=b'{"prompt": "Hi", "max_tokens": ',
                   headers={"Content-Type": "application/json"}, timeout=10)
    assert "not valid JSON" in assert_openai_error(r, 400, param=None)["message"]

    refused = {"echo": True, "logprobs": 2, "suffix": "end", "best_of": 3, "logit_bias": {"50256": -100},
               "presence_penalty": 0.5, "frequency_penalty": 1, "top_k": 5, "response_format": {"type": "json_object"}}
    for name, value in refused.items():
        r = httpx.post(f"{api.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, name: value}, timeout=10)
        assert_openai_error(r, 400, param=name)
    refused_chat = {"logprobs": True, "top_logprobs": 3, "tool_choice": "required",
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                    "functions": [{"name": "f", "parameters": {}}], "response_format": {"type": "json_object"}}
    for name, value in refused_chat.items():
        r = httpx.post(f"{api.url}/v1/chat/completions", json={"messages": ask, "max_tokens": 2, name: value},
                       timeout=10)
        assert_openai_error(r, 400, param=name)
    r = httpx.post(f"{api.url}/v1/chat/completions", json={"max_tokens": 2, "messages": [
        {"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, timeout=10)
    assert_openai_error(r, 400, param="messages.0.tool_calls")

    harmless = {"user": "me", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False,
                "response_format": {"type": "text"}, "metadata": {"a": "b"}, "store": False, "tools": [], "seed": 7,
                "max_completion_tokens": 2, "top_p": 1, "temperature": 0}
    done = oai.chat.completions.create(model="seal-agent", messages=[{"role": "developer", "content": "Be brief."},
                                                                     {"role": "user", "content": "Hi", "name": "x"}],
                                       **harmless)
    assert done.usage.completion_tokens <= 2 and done.choices[0].finish_reason in ("stop", "length")


# -- a bounded fuzz of every POST endpoint ----------------------------------------

def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:  # never a long valid max_tokens: small, negative or huge
        return rng.choice([-1, 0, 1, 2, 3, 2**31, 2**63, 2**64, 10**30, -(10**30)])
    if kind == 3:
        return rng.choice([0.0, 0.5, 1.0, 2.5, -1.0, 1e308, 1e-300, float("inf"), float("nan")])
    if kind == 4:
        return rng.choice(["", "x", "Hello", "é" * 50, "\x00", "\ud7ff\ue000", "\ud800", "x\udfff", "a" * 5000,
                           "[DONE]", "null"])
    if kind == 5:
        return rng.choice([[], {}, "text", "user"])
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(["type", "text", "role", "content", "x", ""]): _value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [[[[[[_value(rng, depth + 3)]]]]]]


# document names that are never taken, so the fuzz queues no learning
BAD_NAMES = ["", ".", "..", "../x.txt", "a/b.txt", "a\\b.txt", ".hidden.txt", "x\x00.txt", "é" * 200 + ".txt",
             "n" * 300, "x.txt.part", "x\ud800.txt", 5, None, [], {"a": 1}, True]


def _body(rng: random.Random, path: str) -> tuple[bytes, dict]:
    json_type = {"Content-Type": "application/json"}
    if path == "/v1/documents":
        body = {"filename": rng.choice(BAD_NAMES), "content": "x"}
        fields = ["content", "content_base64", "extra"]
    elif path == "/v1/completions":
        body = {"model": "seal-agent", "prompt": "Hi", "max_tokens": 2}
        fields = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
                  "model", "logprobs", "echo", "suffix", "best_of", "user", "logit_bias", "max_completion_tokens"]
    else:
        body = {"model": "seal-agent", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        fields = ["messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
                  "model", "tools", "response_format", "logprobs", "top_logprobs", "max_completion_tokens"]
    how = rng.randrange(10)
    if how < 5:  # some fields set to anything
        for name in rng.sample(fields, rng.randint(1, 3)):
            body[name] = _value(rng)
        if path == "/v1/chat/completions" and rng.random() < 0.5:
            body["messages"] = [{"role": rng.choice(["user", "system", "tool", 3, None]), "content": _value(rng)}]
        return json.dumps(body).encode(), json_type
    if how == 5:  # a field left out
        del body[rng.choice(list(body))]
        return json.dumps(body).encode(), json_type
    if how == 6:  # truncated
        raw = json.dumps(body).encode()
        return raw[: rng.randrange(len(raw))], json_type
    if how == 7:  # not UTF-8
        raw = json.dumps(body).encode()
        at = rng.randrange(len(raw))
        return raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + raw[at:], json_type
    if how == 8:  # another content type, or none
        return json.dumps(body).encode(), rng.choice(
            [{"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"},
             {"Content-Type": "multipart/form-data; boundary=x"}, {"Content-Type": "application/json; charset=latin-1"}])
    # some other JSON document: a list, a number, deep nesting, a number too long to parse
    return rng.choice([b"[]", b"null", b"42", b'"x"', b"[" * 5000 + b"]" * 5000, b'{"a": ' * 3000 + b"1" + b"}" * 3000,
                       b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", b"{}", b""]), json_type


def _assert_answer(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert_openai_error(r)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text)
        assert events[-1] == "[DONE]", (what, events[-3:])
        assert all(isinstance(e["choices"], list) for e in events[:-1]), (what, events)
        return
    body = r.json()
    assert body["object"] in ("text_completion", "chat.completion") and body["choices"], (what, body)


def test_fuzzed_requests_get_json_answers_never_a_5xx(api):
    rng = random.Random(1066)
    paths = ["/v1/chat/completions", "/v1/completions", "/v1/documents"]
    with httpx.Client(base_url=api.url, timeout=60) as h:
        for i in range(300):
            path = paths[i % 3]
            body, headers = _body(rng, path)
            _assert_answer(h.post(path, content=body, headers=headers), f"#{i} POST {path} {body[:200]!r}")
        for job in ("0", "-1", "abc", "1e5", "9" * 30, "9" * 5000, "%00", "1.5"):
            _assert_answer(h.get(f"/v1/jobs/{job}"), f"GET /v1/jobs/{job[:20]}")
        _assert_answer(h.get("/v1/chat/completions"), "GET on a POST route")
        _assert_answer(h.post("/v1/nothing", json={}), "no such route")
        assert h.get("/healthz", timeout=5).json()["status"] == "ok"
        assert h.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    assert "Traceback" not in api.log.read_text()


# -- with a token: many streams at once, then SIGTERM ------------------------------

def test_many_streams_at_once_then_sigterm_with_a_token(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state", extra=DAEMON_CONFIG)
    d = Daemon(cfg, free_port(), "--inbox", str(tmp_path / "inbox"), "--set", "api.token='s3cret'", token="s3cret")
    try:
        d.wait_up()
        # the scheme in any case; with a token, any host name (the token protects)
        auth = {"Authorization": "bearer s3cret", "Host": "my-box.lan"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer é".encode()},
                        {"Authorization": "s3cret"}):
            r = httpx.get(f"{d.url}/v1/models", headers=headers, timeout=5)
            assert_openai_error(r, 401, code="invalid_api_key")
        assert httpx.get(f"{d.url}/v1/models", headers={"Authorization": "BEARER s3cret"}, timeout=5).is_success

        # an empty prompt used to kill its stream's generation and hang the request for good;
        # 41 of them took every worker thread
        def empty_stream(_):
            return httpx.post(f"{d.url}/v1/completions", json={"prompt": "", "max_tokens": 5, "stream": True},
                              headers=auth, timeout=30)

        with ThreadPoolExecutor(41) as pool:
            answers = list(pool.map(empty_stream, range(41)))
        for r in answers:
            assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]", r.text[-300:]
        assert httpx.get(f"{d.url}/healthz", headers=auth, timeout=3).status_code == 200
        r = httpx.post(f"{d.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, headers=auth, timeout=10)
        assert r.json()["usage"]["completion_tokens"] == 3

        # streams still writing (or waiting for the model) when the daemon is told to stop
        def long_stream(_):
            try:
                with httpx.stream("POST", f"{d.url}/v1/completions", headers=auth, timeout=60,
                                  json={"prompt": "The Normans", "max_tokens": 1900, "stream": True}) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass  # cut off by the stop

        pool = ThreadPoolExecutor(6)
        pending = [pool.submit(long_stream, i) for i in range(6)]
        time.sleep(1.0)
        t0 = time.monotonic()
        assert d.stop() == 0, d.log.read_text()[-3000:]
        assert time.monotonic() - t0 < 30
        for f in pending:
            f.result(timeout=30)
        pool.shutdown()
    finally:
        d.stop()
    log = d.log.read_text()
    assert "daemon stopped" in log and "generation cancelled" in log, log[-3000:]
