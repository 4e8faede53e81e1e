"""The OpenAI-compatible server (gpt/serve.py), talked to with the real `openai` client on a loopback port."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import ROOT, run_cli

from gpt.chat import PLAIN_STOPS
from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.serve import create_app
from gpt.tokenizer import Tokenizer

KEY = "sekrit"
ALPHABET = string.ascii_letters + " :\n.,!?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: greedy choices are far from ties
        model.lm_head.weight.mul_(4)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("serve") / "model")


def serve_config(*overrides):
    from hydra import compose, initialize_config_dir

    from gpt.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("serve", overrides=list(overrides))


@pytest.fixture(scope="module")
def server(model_dir):
    """The app in a uvicorn thread on a free loopback port; yields (base url, the app's shared state)."""
    cfg = serve_config(
        f"ckpt={model_dir}",
        "device=cpu",
        "dtype=float32",
        "stop_at_eos=false",
        f"api_key={KEY}",
        "max_body_bytes=2000",
        "log_level=warning",
    )
    app = create_app(cfg)
    with running(app) as url:
        yield url, app.app.state.server


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn in a thread on a free loopback port; yields its base url."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def sample_py(model_dir, prompt, n, *extra, temperature=0):
    """sample.py's completion of `prompt` (stdout is the prompt, the text and a dashed line)."""
    proc = run_cli(
        "sample.py",
        f"ckpt={model_dir}",
        f"prompt='{prompt}'",
        f"temperature={temperature}",
        f"max_new_tokens={n}",
        "stop_at_eos=false",
        "stream=false",
        "device=cpu",
        "dtype=float32",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt) and proc.stdout.endswith("\n---------------\n"), proc.stdout
    return proc.stdout[len(prompt) : -len("\n---------------\n")]


def test_greedy_completions_equal_sample_py_streamed_or_not(client, model_dir):
    expected = sample_py(model_dir, "Hello there", 24)
    r = client.completions.create(model="m", prompt="Hello there", max_tokens=24, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (11, 24, 35)
    chunks = list(client.completions.create(model="m", prompt="Hello there", max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == [str(model_dir)]


def test_chat_is_the_completion_of_its_template(client):
    prompt = "System: Be brief.\nUser: Hi\nAssistant:"
    plain = client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0, stop=PLAIN_STOPS[:3])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=30, temperature=0)
    reply = plain.choices[0].text.removeprefix(" ")  # (the template's space after "Assistant:" is not the reply's)
    assert r.choices[0].message.content == reply
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(prompt)
    stream = client.chat.completions.create(
        model="m", messages=messages, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_strings_cut_the_text_and_end_it(client):
    full = client.completions.create(model="m", prompt="abc", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:8]
    r = client.completions.create(model="m", prompt="abc", max_tokens=30, temperature=0, stop=[stop, "QQQQ"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model="m", prompt="abc", max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text  # nothing past the stop leaks out
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_seeds_and_batched_requests_equal_single_ones(client, model_dir):
    args = dict(model="m", prompt="Once", max_tokens=20, temperature=1.0, seed=5)
    two = client.completions.create(n=2, **args)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 40
    assert two.choices[0].text != two.choices[1].text  # two draws
    assert [c.text for c in client.completions.create(n=2, **args).choices] == [c.text for c in two.choices]
    assert client.completions.create(**args).choices[0].text == two.choices[0].text  # choice 0: the seed itself
    # choice 0 draws what sample.py draws from the same seed (top_k=null: the server's default)
    assert two.choices[0].text == sample_py(model_dir, "Once", 20, "seed=5", "top_k=null", temperature=1.0)
    # Concurrent requests of different lengths and settings share the batch (joining, leaving, left padding):
    # each gets what it gets alone.
    requests = [
        dict(model="m", prompt=p, max_tokens=m, temperature=0)
        for p, m in (("a", 40), ("Hello there, who", 12), ("To be or", 25), ("x", 5), ("What is it?", 33))
    ]
    alone = [client.completions.create(**r).choices[0].text for r in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.completions.create(**r).choices[0].text, requests))
    assert together == alone


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    url, state = server
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [  # (route, body or raw bytes, headers, status, param)
        ("/v1/completions", b'{"prompt": "a",', auth, 400, None),
        ("/v1/completions", b"[1, 2]", auth, 400, None),
        ("/v1/completions", {"prompt": "a", "max_tokenz": 5}, auth, 400, "max_tokenz"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, auth, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "temperature": True}, auth, 400, "temperature"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, auth, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 65}, auth, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "a" * 65}, auth, 400, "prompt"),
        ("/v1/completions", {"prompt": "caf\u00e9"}, auth, 400, "prompt"),
        ("/v1/completions", {"prompt": "a", "stop": [""]}, auth, 400, "stop"),
        ("/v1/completions", {"prompt": "a", "n": 99}, auth, 400, "n"),
        ("/v1/completions", {}, auth, 400, "prompt"),
        ("/v1/chat/completions", {"messages": []}, auth, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, auth, 400, "messages.0.role"),
        ("/v1/completions", {"prompt": "a" * 3000}, auth, 413, None),
        ("/v1/completions", {"prompt": "a"}, {}, 401, None),
        ("/v1/models", None, {"Authorization": "Bearer wrong"}, 401, None),
        ("/v1/nothing", {"prompt": "a"}, auth, 404, None),
    ]
    with httpx.Client(base_url=url, timeout=10) as http:
        for route, body, headers, status, param in cases:
            if body is None:
                r = http.get(route, headers=headers)
            elif isinstance(body, bytes):
                r = http.post(route, content=body, headers={**headers, "Content-Type": "application/json"})
            else:
                r = http.post(route, json=body, headers=headers)
            assert r.status_code == status, (route, body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
            assert error["param"] == param, (body, error)
        # a chunked body (no Content-Length) is counted too
        r = http.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * 3000, b'"}']), headers=auth)
        assert r.status_code == 413, r.text
        assert http.get("/health").json()["status"] == "ok"  # /health needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model="m", prompt="a", max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    url, state = server
    engine = state.engine
    advance = engine.advance

    def slow(job, token):  # ~20 ms a token: 60 tokens would take over a second
        time.sleep(0.02)
        return advance(job, token)

    engine.advance = slow
    try:
        body = {"prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as http:
            with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                job = engine.rows[0]
            start = time.time()
            while engine.rows and time.time() - start < 5:
                time.sleep(0.01)
            assert not engine.rows and job.cancelled and len(job.generated) < 60
    finally:
        engine.advance = advance


def test_sigterm_lets_the_stream_finish_and_exits_0(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt.serve", f"ckpt={model_dir}", f"port={port}", "device=cpu", "stop_at_eos=false"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.time() + 60
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
                    time.sleep(0.1)
            body = {"prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_continuous_batching_rows_join_and_leave_and_each_gets_what_it_gets_alone():
    """The engine driven step by step: 30 greedy jobs (prompts of 1-40 tokens, 1-48 new tokens, a context of 48,
    so some fill it) arrive at random steps into a batch of at most 5; each one's text, finish reason and token
    count equal those of the same job run alone."""
    import random

    from gpt.engine import Engine, Job

    tok = Tokenizer.char_level(string.ascii_letters)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    rng = random.Random(0)
    specs = [([rng.randrange(52) for _ in range(rng.randint(1, 40))], rng.randint(1, 48)) for _ in range(30)]

    def run(engine, jobs_at):  # {step: [(key, spec)]} -> {key: the "done" event}
        done = {}
        with torch.inference_mode():
            step = 0
            while len(done) < sum(map(len, jobs_at.values())):
                engine.submit(
                    [
                        Job(
                            list(ids),
                            n,
                            0.0,
                            None,
                            [],
                            None,
                            lambda e, key=key: done.__setitem__(key, e) if e[0] != "delta" else None,
                        )
                        for key, (ids, n) in jobs_at.get(step, [])
                    ]
                )
                engine.step()
                step += 1
        return done

    arrivals = {}
    for key, spec in enumerate(specs):
        arrivals.setdefault(rng.randint(0, 150), []).append((key, spec))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (and on a busy machine, long)
    try:
        together = run(Engine(model, tok, stop_at_eos=False, max_batch_size=5, batch_window_s=0), arrivals)
        alone = {
            key: run(Engine(model, tok, stop_at_eos=False, batch_window_s=0), {0: [(key, spec)]})[key]
            for key, spec in enumerate(specs)
        }
    finally:
        torch.set_num_threads(threads)
    assert together == alone
    assert any(e[2] < n for (_, n), e in zip(specs, alone.values()))  # some filled the context before n tokens


def test_a_bad_setting_is_one_error_line(model_dir):
    from conftest import assert_user_error

    assert_user_error(run_cli("-m gpt.serve", f"ckpt={model_dir}", "max_batch_size=0"), "max_batch_size")
    assert_user_error(run_cli("-m gpt.serve", f"ckpt={model_dir}", "max_choices=0"), "max_choices")
    assert_user_error(run_cli("-m gpt.serve", f"ckpt={model_dir}", "cors_origins=http://a"), "cors_origins")
    assert_user_error(run_cli("-m gpt.serve", f"ckpt={model_dir}", "prefix_cache_tokens=8"), "prefix_cache_tokens")
    assert_user_error(run_cli("-m gpt.serve", "port=8000"), "ckpt=")


# ----------------------------------------------------------------------------------------------------
# No client can hurt another: caps, text that is not text, bugs, and abandoned work


def error_of(r, status, param):
    """The OpenAI error body of response `r`, checked: its status, its four fields, its param."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), error
    return error


def post_json(http, route, raw: str):
    """POST a JSON text as it is (json.dumps escapes a lone surrogate as \\ud800; httpx's json= cannot)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return http.post(route, content=raw.encode(), headers=headers)


def test_prompts_times_n_is_capped_before_any_prompt_is_read(server):
    url, state = server
    assert state.cfg.max_choices == 256 and state.cfg.max_n == 8
    with httpx.Client(base_url=url, timeout=10) as http:
        # 33 x 8 = 264 choices: refused, naming the limit, before the prompts (which could not be encoded) are read
        r = post_json(http, "/v1/completions", json.dumps({"prompt": ["caf\u00e9"] * 33, "n": 8}))
        error = error_of(r, 400, "prompt")
        assert "264 choices" in error["message"] and "max_choices=256" in error["message"], error
        # 32 x 8 = 256 is allowed: the error is now the prompt's own
        r = post_json(http, "/v1/completions", json.dumps({"prompt": ["caf\u00e9"] * 32, "n": 8}))
        assert "never seen" in error_of(r, 400, "prompt")["message"]


def test_lone_surrogates_are_a_400_naming_the_field_and_crlf_bom_are_read_as_text(server, client):
    url, _ = server
    with httpx.Client(base_url=url, timeout=10) as http:
        cases = [
            ("/v1/completions", {"prompt": "ab\ud800"}, "prompt", "U+D800 at character 2"),
            ("/v1/completions", {"prompt": ["ab", "\udfffa"]}, "prompt", "prompt[1] holds a lone surrogate"),
            ("/v1/completions", {"prompt": "ab", "stop": ["x\ud800"]}, "stop", "U+D800 at character 1"),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "\udc00"}]},
                "messages",
                "messages[1].content holds a lone surrogate (U+DC00",
            ),
        ]
        for route, body, param, words in cases:
            raw = json.dumps({**body, "max_tokens": 2})
            assert "\\ud" in raw  # the escape travels as JSON text
            error = error_of(post_json(http, route, raw), 400, param)
            assert words in error["message"], error
    # CRLF is LF and a leading BOM is dropped: the same prompt, the same tokens and text
    args = dict(model="m", max_tokens=8, temperature=0)
    plain = client.completions.create(prompt="Hi there\nyou", **args)
    odd = client.completions.create(prompt="\ufeffHi there\r\nyou", **args)
    assert odd.choices[0].text == plain.choices[0].text and odd.usage.prompt_tokens == plain.usage.prompt_tokens == 12


def test_a_bug_is_a_json_500_and_the_server_goes_on(server, client):
    from fastapi.testclient import TestClient

    from gpt.api import Guard

    url, state = server
    encode = state.encode

    def broken(text, param):
        raise RuntimeError("boom\nsecond line")

    state.encode = broken  # a bug inside a route: FastAPI's handler answers in OpenAI's shape
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            error = error_of(post_json(http, "/v1/completions", '{"prompt": "ab"}'), 500, None)
        assert error["message"].startswith("the server failed on this request (RuntimeError: boom second line)")
    finally:
        state.encode = encode
    assert client.completions.create(model="m", prompt="a", max_tokens=3, temperature=0).usage.completion_tokens == 3

    async def crash(scope, receive, send):  # a bug outside FastAPI, below Guard: Guard's own net answers
        raise KeyError("lost")

    r = TestClient(Guard(crash, None, 1000)).get("/v1/models")
    assert "(KeyError: 'lost')" in error_of(r, 500, None)["message"]


def raw_request(url: str, body: dict) -> socket.socket:
    """A POST /v1/completions sent on a raw socket, left open (closing it is the client going away)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_request_of_256_choices_is_dropped_within_a_step(server, client, stream):
    """256 choices (32 prompts x n=8: 16 running, 240 waiting), each up to the full context, on an engine slowed
    to >= 16 ms a step; the client leaves. Without cancellation this is ~1,000 steps (> 16 s); the batch and the
    queue must be empty within 2 s, and the next request answered at once."""
    url, state = server
    engine = state.engine
    expected = client.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0).choices[0].text
    advance = engine.advance

    def slow(job, token):
        time.sleep(0.001)
        return advance(job, token)

    engine.advance = slow
    try:
        body = {"prompt": ["To be, or not"] * 32, "n": 8, "temperature": 0.9, "seed": 1, "stream": stream}
        sock = raw_request(url, body)
        with httpx.Client(base_url=url, timeout=10) as http:
            deadline = time.time() + 10
            while http.get("/health").json()["running"] < 16:
                assert time.time() < deadline
                time.sleep(0.01)
            health = http.get("/health").json()
            assert (health["running"], health["waiting"]) == (16, 240)
            if stream:
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # the stream has begun
            sock.close()
            left = time.time()
            while (health := http.get("/health").json())["running"] or health["waiting"]:
                assert time.time() - left < 2.0, health
                time.sleep(0.01)
            start = time.time()
            r = client.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0)
            assert r.choices[0].text == expected and time.time() - start < 2.0
    finally:
        engine.advance = advance


# ----------------------------------------------------------------------------------------------------
# The chat page (in a browser: tests/test_chat_page.py) and the prefix cache (the engine's: tests/test_prefix_cache.py)


def test_the_chat_page_needs_no_key_and_fetches_nothing_from_elsewhere(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=10) as http:
        r = http.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
        assert http.get("/v1/models").status_code == 401  # the key is still asked for everywhere else
    page = r.text
    for outside in ("http://", "https://", 'src="//', "@import"):  # self-contained: no CDN, no other server
        assert outside not in page, outside


def test_a_shared_system_prompt_is_read_from_the_prefix_cache(server, client):
    """The server's prefix cache (prefix_cache_block: 16 tokens): usage counts the prompt tokens it served, and a
    prompt answered from the cache is answered as it was without it (its first time)."""
    _, state = server
    assert (state.cfg.prefix_cache_block, state.engine.prefix_cache.block) == (16, 16)
    system = {"role": "system", "content": "Be terse and kind."}  # "System: Be terse and kind.\nUser: ": 33 chars

    def ask(text, **kw):
        messages = [system, {"role": "user", "content": text}]
        return client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0, **kw)

    first = ask("Hi there, friend")  # 60 tokens, all new
    other = ask("Who")
    again = ask("Hi there, friend")
    stream = list(ask("Hi there, friend", stream=True, stream_options={"include_usage": True}))
    assert first.usage.prompt_tokens == 60
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, other, again, stream[-1])]
    assert cached == [0, 32, 48, 48]  # the 2 shared blocks; the 3 whole blocks of 59 tokens (one is left to read)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == first.choices[0].message.content
