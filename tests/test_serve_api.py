"""The server's OpenAI surface beyond the basics (gpt/serve.py, gpt/api.py, gpt/metrics.py): every request shape the
`openai` client sends, answered or refused by name; per-request penalties, logit_bias, top_k and min_p, checked
against a direct computation on the model; backpressure (429), request_timeout, /metrics, CORS, /tokenize and
/detokenize; chat replies without the template's separator space."""

import collections
import concurrent.futures
import random
import string
import threading
import time

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_serve import KEY, running, serve_config

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.engine import Engine, Job
from gpt.generate import sample_next_token
from gpt.model import GPT
from gpt.serve import create_app
from gpt.tokenizer import Tokenizer

ALPHABET = string.ascii_letters + " :\n.,!?"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: greedy choices are far from ties
        model.lm_head.weight.mul_(4)
    return model, tok, save_model_dir(model, tok, tmp_path_factory.mktemp("api") / "model")


def config(model_dir, *overrides):
    return serve_config(
        f"ckpt={model_dir}",
        "device=cpu",
        "dtype=float32",
        "stop_at_eos=false",
        f"api_key={KEY}",
        "log_level=warning",
        *overrides,
    )


@pytest.fixture(scope="module")
def server(model_and_dir):
    app = create_app(config(model_and_dir[2]))
    with running(app) as url:
        yield url, app.app.state.server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def greedy_by_hand(model, prompt: list[int], n: int, adjust) -> list[int]:
    """n greedy tokens after `prompt`, each from a full forward whose last logits (float64) go through
    adjust(logits, prompt, generated) first. Every choice must win by a margin far above float32's rounding
    (the server decodes from a KV cache in float32), so that the comparison cannot hinge on it."""
    generated, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + generated])).logits[0, -1].double()
            logits = adjust(logits.clone(), prompt, generated)
            top = torch.topk(logits, 2)
            margins.append(float(top.values[0] - top.values[1]))
            generated.append(int(top.indices[0]))
    assert min(margins) > 1e-3, margins
    return generated


def text_of(tok, ids):
    return tok.decode(ids)


# ----------------------------------------------------------------------------------------------------
# What the openai client sends: answered with OpenAI's meaning, or refused by name


def test_explicit_defaults_and_nulls_are_what_leaving_them_out_is(client):
    plain = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    explicit = client.completions.create(
        model="m",
        prompt="Hello",
        max_tokens=12,
        temperature=0,
        logprobs=None,
        echo=False,
        frequency_penalty=0,
        presence_penalty=0,
        logit_bias={},
        user="u1",
        n=None,
        stream=False,
        best_of=1,
        suffix=None,
        seed=None,
        stop=None,
        top_p=None,
    )
    assert explicit.choices[0].text == plain and len(explicit.choices) == 1
    r = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0, extra_body={"stream": None})
    assert r.choices[0].text == plain
    falsy = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0, logprobs=False)
    assert falsy.choices[0].text == plain and falsy.choices[0].logprobs is None

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    same = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=False,
        frequency_penalty=0,
        presence_penalty=0,
        response_format={"type": "text"},
        n=None,
        user="u1",
        store=False,
        metadata={"k": "v"},
        tool_choice="none",
        parallel_tool_calls=False,
        service_tier="auto",
        modalities=["text"],
        stream_options=None,
        safety_identifier="s",
        prompt_cache_key="p",
    )
    assert same.choices[0].message.content == chat.choices[0].message.content


def test_content_parts_developer_role_name_and_null_assistant_content_read_as_plain_messages(client, server):
    _, state = server
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Go"},
    ]
    rich = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}], "name": "ann"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Go", "name": "bob"},
    ]
    args = dict(model="m", max_tokens=16, temperature=0)
    a = client.chat.completions.create(messages=plain, **args)
    b = client.chat.completions.create(messages=rich, **args)
    assert b.choices[0].message.content == a.choices[0].message.content
    assert b.usage.prompt_tokens == a.usage.prompt_tokens == len(state.tokenizer.encode(state.template(plain)))


def test_what_we_cannot_do_is_a_400_naming_it(client):
    messages = [{"role": "user", "content": "Hi"}]
    chat = dict(model="m", messages=messages, max_tokens=2)
    cases = [  # (call, param, words)
        (
            lambda: client.completions.create(model="m", prompt="a", stream_options={"include_usage": True}),
            "stream_options",
            "only allowed with stream: true",
        ),
        (
            lambda: client.chat.completions.create(**chat, response_format={"type": "json_object"}),
            "response_format",
            "no JSON mode",
        ),
        (
            lambda: client.chat.completions.create(
                **chat, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
            ),
            "tools",
            "no function calling",
        ),
        (lambda: client.chat.completions.create(**chat, tool_choice="required"), "tool_choice", "no function calling"),
        (lambda: client.chat.completions.create(**chat, store=True), "store", "nothing is stored"),
        (
            lambda: client.chat.completions.create(**chat, reasoning_effort="high"),
            "reasoning_effort",
            "not a reasoning",
        ),
        (lambda: client.completions.create(model="m", prompt="a", suffix="end"), "suffix", "no insertion"),
        (lambda: client.completions.create(model="m", prompt="a", best_of=3), "best_of", "best_of must equal n"),
        (lambda: client.completions.create(model="m", prompt="a", logit_bias={"x": 1}), "logit_bias", "'x' is not"),
        (lambda: client.completions.create(model="m", prompt="a", logit_bias={"999": 1}), "logit_bias", "'999'"),
        (lambda: client.completions.create(model="m", prompt="a", logit_bias={"3": 101}), "logit_bias.3", "100"),
        (lambda: client.completions.create(model="m", prompt="a", frequency_penalty=2.5), "frequency_penalty", "2"),
        (lambda: client.completions.create(model="m", prompt="a", extra_body={"min_p": 1.5}), "min_p", "1"),
        (
            lambda: client.completions.create(model="m", prompt="a", extra_body={"repetition_penalty": 0}),
            "repetition_penalty",
            "greater than 0",
        ),
        (
            lambda: client.chat.completions.create(
                model="m",
                max_tokens=2,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            ),
            "messages",
            "messages[0].content[0] is an image_url part: this model reads text only",
        ),
        (
            lambda: client.chat.completions.create(
                model="m", max_tokens=2, messages=[{"role": "tool", "content": "1", "tool_call_id": "c"}]
            ),
            "messages",
            "messages[0] is a tool message",
        ),
        (
            lambda: client.chat.completions.create(
                model="m", max_tokens=2, messages=[{"role": "user", "content": None}]
            ),
            "messages",
            "messages[0].content is missing",
        ),
    ]
    for call, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            call()
        error = e.value.body
        assert e.value.status_code == 400 and error["param"] == param and words in error["message"], error
        assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]


def test_models_retrieve_answers_the_model_and_404s_an_unknown_one(client, server):
    _, state = server
    card = client.models.retrieve(state.name)  # a path: the client sends its slashes as %2F
    assert card.id == state.name == client.models.list().data[0].id and card.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "'gpt-4o' does not exist" in e.value.body["message"]


# ----------------------------------------------------------------------------------------------------
# Per-request sampling settings, against a direct computation


def test_penalties_and_logit_bias_equal_a_direct_computation(client, model_and_dir):
    model, tok, _ = model_and_dir
    prompt = "To be or"
    ids = tok.encode(prompt)
    n = 24
    plain = greedy_by_hand(model, ids, n, lambda logits, p, g: logits)

    def openai_penalties(frequency, presence):
        def adjust(logits, prompt, generated):  # OpenAI's formula, over the generated tokens only
            for j, c in collections.Counter(generated).items():
                logits[j] -= c * frequency + (c > 0) * presence
            return logits

        return adjust

    def repetition(r):
        def adjust(logits, prompt, generated):  # HF's / vLLM's: every token seen in the prompt or the output
            for j in set(prompt + generated):
                logits[j] = logits[j] / r if logits[j] > 0 else logits[j] * r
            return logits

        return adjust

    def bias(b):
        def adjust(logits, prompt, generated):
            for j, v in b.items():
                logits[j] += v
            return logits

        return adjust

    first = plain[0]
    cases = [
        ({"frequency_penalty": 1.5}, openai_penalties(1.5, 0)),
        ({"presence_penalty": 1.8}, openai_penalties(0, 1.8)),
        ({"frequency_penalty": 0.7, "presence_penalty": -0.4}, openai_penalties(0.7, -0.4)),
        ({"extra_body": {"repetition_penalty": 3.0}}, repetition(3.0)),
        ({"logit_bias": {str(first): -100}}, bias({first: -100})),
    ]
    for args, adjust in cases:
        expected = greedy_by_hand(model, ids, n, adjust)
        assert expected != plain, args  # the setting changes the text: the comparison can fail
        r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, **args)
        assert r.choices[0].text == text_of(tok, expected), args
    # streamed: the same text
    chunks = client.completions.create(
        model="m", prompt=prompt, max_tokens=n, temperature=0, frequency_penalty=1.5, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == text_of(tok, greedy_by_hand(model, ids, n, cases[0][1]))
    # +100 on one token: every token is that one, greedy or sampled
    t = tok.encode("Q")[0]
    for temperature, seed in ((0, None), (1.0, 3), (2.0, 4)):
        r = client.completions.create(
            model="m", prompt=prompt, max_tokens=n, temperature=temperature, seed=seed, logit_bias={str(t): 100}
        )
        assert r.choices[0].text == "Q" * n


def test_top_k_and_min_p(client, model_and_dir):
    args = dict(model="m", prompt="Once upon", max_tokens=24)
    greedy = client.completions.create(temperature=0, **args).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):  # only the likeliest token is left: sampling is greedy
        for seed in (1, 2):
            r = client.completions.create(temperature=1.5, seed=seed, extra_body=extra, **args)
            assert r.choices[0].text == greedy, extra
    # top_k -1 (vLLM's "none") is the server's default (top_k=null); a seed draws the same text
    sampled = client.completions.create(temperature=1.0, seed=7, **args).choices[0].text
    assert (
        client.completions.create(temperature=1.0, seed=7, extra_body={"top_k": -1}, **args).choices[0].text == sampled
    )
    # min_p keeps exactly the tokens with p >= min_p * p_max: 4000 draws from one row find all of them, no other
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.9]])
    p = logits.softmax(-1)[0]
    for min_p in (0.1, 0.5, 0.61):
        drawn = set(
            sample_next_token(
                logits.repeat(4000, 1), 1.0, min_p=min_p, generator=torch.Generator().manual_seed(0)
            ).tolist()
        )
        assert drawn == {j for j in range(6) if p[j] >= min_p * p.max()}, min_p


def test_rows_with_different_settings_in_one_batch_each_get_what_they_get_alone(model_and_dir):
    """The engine driven step by step: 12 jobs of random settings (greedy or seeded sampling, top_k, top_p, min_p,
    penalties, logit_bias) arrive at random steps into a batch of 4; each ends exactly as it does alone."""
    model, tok, _ = model_and_dir
    rng = random.Random(0)
    V = tok.vocab_size

    def spec():
        return dict(
            ids=[rng.randrange(V - 2) for _ in range(rng.randint(1, 20))],
            n=rng.randint(1, 30),
            temperature=rng.choice([0.0, 0.0, 0.8, 1.3]),
            seed=rng.randrange(1000),
            top_k=rng.choice([None, 3, 20]),
            top_p=rng.choice([None, 0.9]),
            min_p=rng.choice([None, 0.05, 0.3]),
            frequency_penalty=rng.choice([0.0, 0.8, -0.5]),
            presence_penalty=rng.choice([0.0, 1.2]),
            repetition_penalty=rng.choice([1.0, 1.4, 0.7]),
            logit_bias=rng.choice([{}, {rng.randrange(V): rng.uniform(-100, 100) for _ in range(3)}]),
        )

    specs = [spec() for _ in range(12)]

    def job(s, done, key):
        g = torch.Generator().manual_seed(s["seed"]) if s["temperature"] else None
        keys = ("top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias")
        return Job(
            list(s["ids"]),
            s["n"],
            s["temperature"],
            s["top_p"],
            [],
            g,
            lambda e: done.__setitem__(key, e) if e[0] != "delta" else None,
            **{k: s[k] for k in keys},
        )

    def run(arrivals, batch):
        done = {}
        engine = Engine(model, tok, stop_at_eos=False, max_batch_size=batch, batch_window_s=0)
        with torch.inference_mode():
            step = 0
            while len(done) < sum(map(len, arrivals.values())):
                engine.submit([job(specs[k], done, k) for k in arrivals.get(step, [])])
                engine.step()
                step += 1
        return done

    arrivals = {}
    for k in range(len(specs)):
        arrivals.setdefault(rng.randint(0, 40), []).append(k)
    together = run(arrivals, 4)
    alone = {k: run({0: [k]}, 1)[k] for k in range(len(specs))}
    assert together == alone


# ----------------------------------------------------------------------------------------------------
# Chat replies, /tokenize and /detokenize


def test_a_chat_reply_drops_the_templates_separator_space_once(client, server):
    _, state = server
    space = state.tokenizer.encode(" ")[0]
    messages = [{"role": "user", "content": "Hi"}]
    args = dict(model="m", messages=messages, max_tokens=3, temperature=0, logit_bias={str(space): 100})
    assert client.chat.completions.create(**args).choices[0].message.content == "  "  # 3 spaces drawn, 1 dropped
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "  "
    # the completion of the same template text keeps all three
    text = state.template(messages)
    r = client.completions.create(model="m", prompt=text, max_tokens=3, temperature=0, logit_bias={str(space): 100})
    assert r.choices[0].text == "   " and state.template.reply(r.choices[0].text) == "  "


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=ALPHABET, min_size=1, max_size=100))
def test_tokenize_detokenize_round_trip(server, text):
    url, state = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        r = http.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert r["tokens"] == state.tokenizer.encode(text) and r["count"] == len(text) and r["max_model_len"] == 64
        assert "".join(r["token_strs"]) == text
        assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
        messages = [{"role": "user", "content": text}]
        chat = http.post("/tokenize", json={"messages": messages}).json()
        assert chat["tokens"] == state.tokenizer.encode(state.template(messages))


def test_tokenize_refusals(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        for body, param, words in [
            ({"prompt": "caf\u00e9"}, "prompt", "never seen"),
            ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt", "one of them"),
            ({}, "prompt", "one of them"),
        ]:
            r = http.post("/tokenize", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert words in r.json()["error"]["message"], r.text
        r = http.post("/detokenize", json={"tokens": [1, 500]})
        assert r.status_code == 400 and "token id 500" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------------
# Backpressure, timeouts, metrics, CORS


class Gate:
    """Holds the engine's steps (its `advance`) until opened: requests pile up exactly as sent."""

    def __init__(self, engine):
        self.engine, self.real, self.open = engine, engine.advance, threading.Event()

    def __enter__(self):
        def held(job, token):
            self.open.wait(30)
            return self.real(job, token)

        self.engine.advance = held
        return self

    def __exit__(self, *exc):
        self.open.set()
        self.engine.advance = self.real


def test_a_full_queue_answers_429_with_retry_after_and_only_beyond_the_limit(model_and_dir):
    """max_batch_size 2 + max_waiting 3: with the engine held, 5 one-choice requests are admitted and the other 7 of
    a flood of 12 are refused with 429 (OpenAI's shape, Retry-After); once the engine runs, the 5 are answered."""
    app = create_app(config(model_and_dir[2], "max_batch_size=2", "max_waiting=3"))
    state = app.app.state.server
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        with Gate(state.engine) as gate:

            def one(i):  # the text, or the 429 (any other error fails the test); every other one streamed
                try:
                    args = dict(model="m", prompt="Hi", max_tokens=4, temperature=0)
                    if i % 2:
                        return client.completions.create(**args).choices[0].text
                    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **args))
                except openai.RateLimitError as e:
                    return e

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                futures = [pool.submit(one, i) for i in range(12)]
                deadline = time.time() + 30
                while sum(f.done() for f in futures) < 7:
                    assert time.time() < deadline
                    time.sleep(0.01)
                refused = [f.result() for f in futures if f.done()]
                assert state.load == 5
                gate.open.set()
                answers = [f.result() for f in futures]
        assert len(refused) == 7 and all(isinstance(e, openai.RateLimitError) for e in refused)
        for e in refused:
            assert e.status_code == 429 and e.response.headers["retry-after"] == "1"
            assert e.body["code"] == "rate_limit_exceeded" and "max_waiting=3" in e.body["message"]
        texts = [a for a in answers if isinstance(a, str)]
        assert len(texts) == 5 and len(set(texts)) == 1 and len(texts[0]) == 4
        assert state.load == 0
        # metrics: this app's own registry (the module's other apps counted apart)
        families = scrape(url)
        assert families["gpt_rejected"]["gpt_rejected_total", ()] == 7
        assert families["gpt_requests"]["gpt_requests_total", (("route", "/v1/completions"), ("status", "429"))] == 7


def test_a_request_past_request_timeout_is_cancelled_and_answered_504(model_and_dir):
    app = create_app(config(model_and_dir[2], "request_timeout=0.5"))
    state = app.app.state.server
    with running(app) as url, Gate(state.engine):
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        start = time.time()
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt="Hi", max_tokens=4, temperature=0)
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout" and 0.5 <= time.time() - start < 5
        assert "request_timeout=0.5" in e.value.body["message"]
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            body = {"prompt": "Hi", "max_tokens": 4, "stream": True}
            lines = [line for line in http.post("/v1/completions", json=body).text.split("\n") if line]
        assert '"code": "timeout"' in lines[-1] and "[DONE]" not in lines[-1]
        assert state.load == 0 and all(job.cancelled for job in state.engine.rows)


def scrape(url) -> dict:
    """{family name: {(sample name, sorted labels): value}} of GET /metrics, read by prometheus_client's parser."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return {
        f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


def test_metrics_count_requests_tokens_times_and_prefix_cache_hits(model_and_dir):
    """The request counters and histograms, and the prefix cache's: a prompt of 37 tokens sent again takes its 2
    whole blocks (prefix_cache_block 16) from the cache, which /metrics counts as usage does."""
    app = create_app(config(model_and_dir[2]))
    cache = app.app.state.server.engine.prefix_cache
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        before = scrape(url)
        long = "Hello there, friend. How are you now?"  # 37 tokens: 2 whole blocks and a rest
        prompts = ["Hi", "Hello there", "abc", long, long]
        answers = [client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0) for p in prompts]
        messages = [{"role": "user", "content": "Hi"}]
        stream = client.chat.completions.create(
            model="m",
            messages=messages,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chat_usage = list(stream)[-1].usage
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="m", prompt="a", max_tokens=0)
        httpx.get(url + "/v1/models")  # no key: 401, counted on its route
        chat_prompt = len(app.app.state.server.template([{"role": "user", "content": "Hi"}]))
        m = scrape(url)
    requests = m["gpt_requests"]
    done = len(prompts)
    assert requests["gpt_requests_total", (("route", "/v1/completions"), ("status", "200"))] == done
    assert requests["gpt_requests_total", (("route", "/v1/completions"), ("status", "400"))] == 1
    assert requests["gpt_requests_total", (("route", "/v1/chat/completions"), ("status", "200"))] == 1
    assert requests["gpt_requests_total", (("route", "/v1/models"), ("status", "401"))] == 1
    assert m["gpt_prompt_tokens"]["gpt_prompt_tokens_total", ()] == sum(map(len, prompts)) + chat_prompt
    assert m["gpt_completion_tokens"]["gpt_completion_tokens_total", ()] == done * 5 + chat_usage.completion_tokens
    assert m["gpt_time_to_first_token_seconds"]["gpt_time_to_first_token_seconds_count", ()] == done + 1
    latency = m["gpt_request_latency_seconds"]
    assert latency["gpt_request_latency_seconds_count", (("route", "/v1/completions"),)] == done + 1
    assert latency["gpt_request_latency_seconds_sum", (("route", "/v1/completions"),)] > 0
    assert m["gpt_running"]["gpt_running", ()] == 0 and m["gpt_waiting"]["gpt_waiting", ()] == 0
    # the prefix cache: nothing before; then the second `long` hit its 2 blocks, and /metrics says what usage says
    assert before["gpt_prefix_cache_hit_tokens"]["gpt_prefix_cache_hit_tokens_total", ()] == 0
    assert before["gpt_prefix_cache_tokens"]["gpt_prefix_cache_tokens", ()] == 0
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    assert cached[-2:] == [0, 32]
    hits = m["gpt_prefix_cache_hit_tokens"]["gpt_prefix_cache_hit_tokens_total", ()]
    assert hits == sum(cached) + chat_usage.prompt_tokens_details.cached_tokens == cache.reused >= 32
    stored = m["gpt_prefix_cache_stored_tokens"]["gpt_prefix_cache_stored_tokens_total", ()]
    held = m["gpt_prefix_cache_tokens"]["gpt_prefix_cache_tokens", ()]
    assert stored == cache.stored and held == cache.tokens and stored >= held >= 32  # `long`'s 2 blocks at least
    assert m["gpt_prefix_cache_capacity_tokens"]["gpt_prefix_cache_capacity_tokens", ()] == 4096


def test_metrics_of_a_server_without_a_prefix_cache_read_0(model_and_dir):
    app = create_app(config(model_and_dir[2], "prefix_cache_tokens=0"))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        for _ in range(2):
            r = client.completions.create(model="m", prompt="Hello there, friend. How are you now?", max_tokens=2)
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        m = scrape(url)
    for name, sample in [
        ("gpt_prefix_cache_hit_tokens", "gpt_prefix_cache_hit_tokens_total"),
        ("gpt_prefix_cache_stored_tokens", "gpt_prefix_cache_stored_tokens_total"),
        ("gpt_prefix_cache_tokens", "gpt_prefix_cache_tokens"),
        ("gpt_prefix_cache_capacity_tokens", "gpt_prefix_cache_capacity_tokens"),
    ]:
        assert m[name][sample, ()] == 0, name


def test_cors_headers_only_when_enabled(model_and_dir):
    page = "http://page.example"
    preflight = {
        "Origin": page,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    body = {"prompt": "Hi", "max_tokens": 2}
    with (
        running(create_app(config(model_and_dir[2], f"cors_origins=[{page}]"))) as url,
        httpx.Client(base_url=url) as http,
    ):
        r = http.options("/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = http.post("/v1/completions", json=body, headers={**AUTH, "Origin": page})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = http.post("/v1/completions", json=body, headers={"Origin": page})  # no key: the 401 is readable too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == page
        r = http.options("/v1/completions", headers={**preflight, "Origin": "http://other.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    with running(create_app(config(model_and_dir[2]))) as url, httpx.Client(base_url=url) as http:
        for r in (
            http.options("/v1/completions", headers=preflight),
            http.post("/v1/completions", json=body, headers={**AUTH, "Origin": page}),
        ):
            assert not [h for h in r.headers if h.startswith("access-control-")], r.headers
