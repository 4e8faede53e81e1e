"""No client can hurt another (gpt/serve.py, gpt/engine.py, gpt/generate.py's sampling): numerics that cannot
fail for any value the API accepts, a failure that stays with its own request, abandoned work that costs
nothing, and a property test: random well-typed requests, sent at once beside a fixed greedy one, never get a
5xx, every refusal is OpenAI's error JSON, and the fixed request gets exactly what it gets alone."""

import concurrent.futures
import json
import string

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import running, serve_config

import gpt.engine
from gpt.checkpoint import save_model_dir
from gpt.completions import encode_prompt
from gpt.config import GPTConfig
from gpt.engine import Engine, Job
from gpt.errors import GPTError
from gpt.generate import sample_next_token, scale_by_temperature
from gpt.model import GPT
from gpt.textfiles import user_text
from gpt.tokenizer import Tokenizer

ALPHABET = string.ascii_letters + " :\n.,!?"
TINY = [1e-300, 5e-324, 1e-45, 1e-38, 1e-30]  # 5e-324: the smallest subnormal double; 1e-45: float32's


# ----------------------------------------------------------------------------------------------------
# Numerics: any temperature in [0, 2] and top_p in (0, 1] samples a token


def test_a_tiny_temperature_is_greedy_and_a_tiny_top_p_keeps_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 50) * 3
    best = logits.argmax(-1)
    for t in TINY:
        assert sample_next_token(logits, t, generator=torch.Generator().manual_seed(1)).tolist() == best.tolist()
        rows = [torch.Generator().manual_seed(i) for i in range(8)]  # the engine's way: a stream per row
        assert sample_next_token(logits, t, top_k=5, top_p=0.5, generator=rows).tolist() == best.tolist()
        scaled = scale_by_temperature(logits, t)  # the top logit 0, the others -inf (or nearly): never NaN
        assert not scaled.isnan().any() and scaled.max(-1).values.tolist() == [0.0] * 8
        assert int((scaled < -1e20).sum()) == 8 * 49
        assert torch.equal(scaled.softmax(-1), torch.nn.functional.one_hot(best, 50).float())
    for p in TINY:
        for temperature in (1.0, 2.0, 1e-300):
            got = sample_next_token(logits, temperature, top_p=p, generator=torch.Generator().manual_seed(2))
            assert got.tolist() == best.tolist()
        assert sample_next_token(logits, 1.0, top_k=3, top_p=p).tolist() == best.tolist()


def test_ordinary_temperatures_keep_their_distribution_and_nan_logits_are_still_refused():
    torch.manual_seed(0)
    logits = torch.randn(4, 30) * 5
    for t in (0.3, 1.0, 2.0):
        assert torch.allclose(scale_by_temperature(logits, t).softmax(-1), (logits / t).softmax(-1), atol=1e-6)
    # top_p=0.999 leaves all but the least likely tokens: the draws over 3000 rows cover the top 5 of a row
    row = logits[:1].repeat(3000, 1)
    drawn = set(sample_next_token(row, 1.0, top_p=0.999, generator=torch.Generator().manual_seed(0)).tolist())
    assert set(torch.topk(logits[0], 5).indices.tolist()) <= drawn
    broken = logits.clone()
    broken[2, 7] = float("nan")
    for t in (1.0, 1e-300):
        with pytest.raises(GPTError, match="NaN or Inf"):
            sample_next_token(broken, t)


# ----------------------------------------------------------------------------------------------------
# The engine: one request's failure is its own; abandoned jobs cost nothing


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.char_level(string.ascii_letters)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    return model, tok


def job(ids, n, temperature=0.0, seed=None, events=None, key=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    send = (lambda e: events.setdefault(key, []).append(e)) if events is not None else (lambda e: None)
    return Job(list(ids), n, temperature, None, [], generator, send)


def drive(engine, arrivals: dict, steps=200):
    """Steps the engine, submitting arrivals[step] (lists of jobs) at their step."""
    with torch.inference_mode():
        for step in range(steps):
            engine.submit(arrivals.get(step, []))
            engine.step()


def ends(events):
    """{key: the last event's kind and payload} (done: reason, count, text)."""
    return {key: e[-1] for key, e in events.items()}


def test_a_failing_request_fails_alone_and_the_others_draw_what_they_draw_alone(tiny, monkeypatch):
    """Three jobs sampled at temperature 0.7 (one settings group) and one greedy. Sampling fails for one of
    the three (after its group's random draws were made): it alone gets an error; the two others in its group
    (sampled again, from the random states they had) and the greedy one end exactly as they do alone. A prompt
    the model cannot read (a token id beyond its vocabulary) fails at prefill: that job alone."""
    model, tok = tiny
    specs = {"a": ([3, 4, 5], 0.7, 11), "bad": ([6, 7], 0.7, 12), "c": ([8], 0.7, 13), "g": ([9, 10, 11], 0.0, None)}

    def alone(key):
        events = {}
        ids, t, seed = specs[key]
        drive(Engine(model, tok, stop_at_eos=False, batch_window_s=0), {0: [job(ids, 20, t, seed, events, key)]}, 30)
        return ends(events)[key]

    expected = {key: alone(key) for key in ("a", "c", "g")}
    assert all(e[0] == "done" and e[2] == 20 for e in expected.values())
    events = {}
    jobs = {key: job(ids, 20, t, seed, events, key) for key, (ids, t, seed) in specs.items()}
    real = gpt.engine.sample_next_token

    def flaky(logits, temperature, top_k, top_p, generators, *rest):
        out = real(logits, temperature, top_k, top_p, generators, *rest)  # the group's generators have moved on
        if generators and any(g is jobs["bad"].generator for g in generators) and len(jobs["bad"].generated) == 4:
            raise RuntimeError("a fault of this request's sampling")
        return out

    monkeypatch.setattr(gpt.engine, "sample_next_token", flaky)
    unreadable = job([2, tok.vocab_size + 5], 20, events=events, key="unreadable")
    drive(Engine(model, tok, stop_at_eos=False, batch_window_s=0), {0: list(jobs.values()), 3: [unreadable]}, 30)
    got = ends(events)
    assert got["bad"][0] == "error" and "RuntimeError: a fault of this request's sampling" in got["bad"][1]
    assert len(jobs["bad"].generated) == 4 and [e[0] for e in events["bad"]].count("error") == 1
    assert got["unreadable"][0] == "error" and "IndexError" in got["unreadable"][1]
    assert {key: got[key] for key in expected} == expected


def test_cancelled_jobs_leave_the_queue_in_one_step_without_a_batch_window_each(tiny):
    model, tok = tiny
    engine = Engine(model, tok, stop_at_eos=False, max_batch_size=2, batch_window_s=0.05)
    gone = [job([1, 2], 5) for _ in range(200)]
    for j in gone:
        j.cancelled = True
    live = job([3], 5)
    engine.submit(gone + [live])
    with torch.inference_mode():
        engine.step()  # skips the 200 without counting them: one batch window, one step
    assert engine.waiting.qsize() == 0 and engine.rows == [live]
    # a full batch: a request cancelled while waiting leaves the queue at the next step all the same
    engine.submit([job([4], 30)])
    waiting = [job([5, 6], 5) for _ in range(50)]
    engine.submit(waiting)
    with torch.inference_mode():
        engine.step()
    assert len(engine.rows) == 2 and engine.waiting.qsize() == 50
    engine.cancel(waiting)
    with torch.inference_mode():
        engine.step()
    assert len(engine.rows) == 2 and engine.waiting.qsize() == 0


# ----------------------------------------------------------------------------------------------------
# The property: random requests beside a fixed greedy one


FIXED = {"model": "m", "prompt": "Hello there", "max_tokens": 30, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model whose greedy path is varied (large position embeddings) and far from ties (a peaked
    lm_head, as tests/test_serve.py's): rounding that differs between a batch and a lone request (~1e-5) cannot
    change a greedy choice whose margin is thousands of times that."""
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50)
        model.lm_head.weight.mul_(16)
    ids, margins = tok.encode(FIXED["prompt"]), []
    with torch.no_grad():
        for _ in range(FIXED["max_tokens"]):
            top = torch.topk(model(torch.tensor([ids])).logits[0, -1], 2)
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
    text = tok.decode(ids[len(tok.encode(FIXED["prompt"])) :])
    assert min(margins) > 0.05 and len(set(text)) >= 10, (min(margins), text)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("isolation") / "model"), text


@pytest.fixture(scope="module")
def server(model_dir):
    cfg = serve_config(
        f"ckpt={model_dir[0]}",
        "device=cpu",
        "dtype=float32",
        "max_n=3",
        "max_choices=6",
        "max_batch_size=8",
        "stop_at_eos=false",
        "log_level=warning",
    )
    from gpt.serve import create_app

    app = create_app(cfg)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        alone = http.post("/v1/completions", json=FIXED).json()["choices"][0]["text"]
        assert alone == model_dir[1]  # the server alone = the model's own greedy path
        yield http, app.app.state.server, alone


odd = st.sampled_from(["\r\n", "\ufeff", "\ud800", "\udfff", "\u2028", "\x00", "é", "日本", "\U0001f600", "\r"])
letters = st.text(alphabet=ALPHABET, max_size=20)
texts = st.one_of(  # mostly text the model can read (an answer), else odd text (a refusal, never a 5xx)
    letters,
    letters,
    letters,
    letters,
    st.builds(lambda a, o, b: a + o + b, letters, odd, letters),
    st.builds(lambda a: "\ufeff" + a.replace("\n", "\r\n"), letters),
    st.text(max_size=8),  # any code points, lone surrogates among them
    st.text(alphabet=ALPHABET, min_size=60, max_size=70),  # near and past the context
)
requests = st.fixed_dictionaries(
    {
        "temperature": st.one_of(st.none(), st.sampled_from([0.0, 2.0, *TINY]), st.floats(0, 2)),
        "top_p": st.one_of(st.none(), st.sampled_from([1.0, *TINY]), st.floats(0, 1, exclude_min=True)),
        "n": st.integers(1, 3),
        "max_tokens": st.one_of(st.none(), st.integers(1, 64)),
        "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
        "stop": st.one_of(st.none(), texts, st.lists(texts, max_size=4)),
        "stream": st.booleans(),
        "top_k": st.one_of(st.none(), st.integers(-1, 80)),
        "min_p": st.one_of(st.none(), st.sampled_from([0.0, 1.0, *TINY]), st.floats(0, 1)),
        "frequency_penalty": st.one_of(st.none(), st.floats(-2, 2)),
        "presence_penalty": st.one_of(st.none(), st.floats(-2, 2)),
        # any positive float: a tiny or huge penalty sends logits to float32's limits, still a token
        "repetition_penalty": st.one_of(st.none(), st.sampled_from([1.0, 1e300, *TINY]), st.floats(0.01, 100)),
        "logit_bias": st.one_of(
            st.none(),
            st.dictionaries(st.one_of(st.integers(0, 70).map(str), st.text(max_size=3)), st.floats(-100, 100)),
        ),
    }
).flatmap(
    lambda r: st.one_of(
        st.builds(lambda p: {**r, "prompt": p}, st.one_of(texts, st.lists(texts, min_size=1, max_size=3))),
        st.builds(
            lambda m: {**r, "messages": [{"role": role, "content": c} for role, c in m]},
            st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), min_size=1, max_size=3),
        ),
    )
)


def expect_ok(state, r) -> bool:
    """Whether the server must answer `r` with 200: our own reading of the documented rules."""
    try:
        for s in [r["stop"]] if isinstance(r["stop"], str) else r["stop"] or []:
            user_text(s, "stop")
        if "prompt" in r:
            prompts = [r["prompt"]] if isinstance(r["prompt"], str) else r["prompt"]
            texts = [user_text(p, "prompt") for p in prompts]
        else:
            prompts = [0]
            texts = [state.template([{**m, "content": user_text(m["content"], "m")} for m in r["messages"]])]
        ids = [encode_prompt(state.tokenizer, t) for t in texts]
    except GPTError:
        return False
    stops = [r["stop"]] if isinstance(r["stop"], str) else r["stop"] or []
    vocab = state.tokenizer.vocab_size
    bias = all(k.isascii() and k.isdigit() and int(k) < vocab for k in r["logit_bias"] or {})
    return len(prompts) * r["n"] <= 6 and all(len(i) <= 64 for i in ids) and len(stops) <= 4 and all(stops) and bias


def check(state, r, resp: httpx.Response):
    """No 5xx; a refusal is OpenAI's error JSON; an answer has every choice, ended."""
    assert resp.status_code < 500, (r, resp.text)
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert resp.status_code == 400 and error["message"] and not expect_ok(state, r), (r, error)
        return
    assert expect_ok(state, r), r
    count = r["n"] * (len(r["prompt"]) if isinstance(r.get("prompt"), list) else 1)
    if not r["stream"]:
        body = resp.json()
        assert [c["index"] for c in body["choices"]] == list(range(count))
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        assert body["usage"]["completion_tokens"] <= count * (r["max_tokens"] or 64)
        return
    lines = [line for line in resp.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == list(range(count))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(requests, min_size=1, max_size=3))
def test_random_requests_never_5xx_and_never_change_a_greedy_neighbour(server, batch):
    http, state, alone = server

    def post(r):
        route = "/v1/completions" if "prompt" in r else "/v1/chat/completions"
        body = {k: v for k, v in r.items() if v is not None}
        # json.dumps escapes a lone surrogate (\ud800), as a client in another language would send it
        return http.post(route, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    with concurrent.futures.ThreadPoolExecutor(len(batch) + 1) as pool:
        fixed = pool.submit(http.post, "/v1/completions", json=FIXED)
        answers = list(pool.map(post, batch))
    for r, resp in zip(batch, answers):
        check(state, r, resp)
    assert fixed.result().status_code == 200 and fixed.result().json()["choices"][0]["text"] == alone
