"""The server's `logprobs` and `echo` (gpt/serve.py, gpt/logprobs.py): every number is checked against the model's
own log-softmax, computed here from a full forward; and lm-evaluation-harness's `local-completions` model run
against the server on a loopback port, its loglikelihoods checked against the same numbers."""

import json
import string

import httpx
import openai
import pytest
import torch
from test_serve import KEY, running, serve_config

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.serve import create_app
from gpt.tokenizer import Tokenizer

ALPHABET = string.ascii_letters + " :\n.,!?"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: the likeliest tokens are far from ties
        model.lm_head.weight.mul_(4)
    return model, tok, save_model_dir(model, tok, tmp_path_factory.mktemp("logprobs") / "model")


@pytest.fixture(scope="module")
def server(model_and_dir):
    model, tok, model_dir = model_and_dir
    cfg = serve_config(f"ckpt={model_dir}", "device=cpu", "dtype=float32", f"api_key={KEY}", "log_level=warning")
    with running(create_app(cfg)) as url:
        yield url


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as client:
        yield client


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab): the model's log-softmax after each prefix of `ids`, from one full forward."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)


def post(http, body: dict, route="/v1/completions") -> dict:
    r = http.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_echoed_prompt_logprobs_are_the_models_own(model_and_dir, http):
    model, tok, _ = model_and_dir
    prompt = "Hello there, who art thou?"
    ids = tok.encode(prompt)
    expected = own_logprobs(model, ids)
    body = {"prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 0}
    r = post(http, body)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert r["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert lp["tokens"] == list(prompt) and lp["text_offset"] == list(range(len(prompt)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    got = torch.tensor(lp["token_logprobs"][1:])
    want = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    for t, top in enumerate(lp["top_logprobs"][1:]):
        values, indices = expected[t].topk(5)
        best = {tok.decode([i], skip_special_tokens=False): v for i, v in zip(indices.tolist(), values.tolist())}
        # the five likeliest, and the prompt's own token when it is not among them (OpenAI's up to logprobs + 1)
        assert set(top) == set(best) | {prompt[t + 1]}, (t, top, best)
        for token, value in best.items():
            assert abs(top[token] - value) < 1e-5
        assert list(top)[:5] == list(best)  # most likely first
    # with tokens to sample, the prompt's part is the same and the text goes on after it
    more = post(http, {**body, "max_tokens": 4, "temperature": 0})["choices"][0]
    assert more["text"].startswith(prompt) and len(more["text"]) == len(prompt) + 4
    assert more["logprobs"]["token_logprobs"][: len(ids)] == lp["token_logprobs"]
    assert more["logprobs"]["text_offset"] == list(range(len(prompt) + 4))
    # echo without logprobs: the text only
    plain = post(http, {"prompt": prompt, "echo": True, "max_tokens": 0})["choices"][0]
    assert plain["text"] == prompt and plain["logprobs"] is None


def test_token_id_prompts_equal_text_prompts(model_and_dir, http):
    _, tok, _ = model_and_dir
    prompts = ["To be, or not", "Who is there?", "a"]
    common = {"echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}
    by_text = post(http, {"prompt": prompts, **common})
    by_ids = post(http, {"prompt": [tok.encode(p) for p in prompts], **common})
    assert by_ids["choices"] == by_text["choices"] and by_ids["usage"] == by_text["usage"]
    # alone, the prompt is read without the others' left padding: the same tokens, numbers equal to float precision
    one = post(http, {"prompt": tok.encode(prompts[0]), **common})["choices"][0]
    assert one["text"] == by_text["choices"][0]["text"]
    alike = {
        **one["logprobs"],
        "token_logprobs": None,
        "top_logprobs": [list(t or []) for t in one["logprobs"]["top_logprobs"]],
    }
    first = by_text["choices"][0]["logprobs"]
    assert alike == {**first, "token_logprobs": None, "top_logprobs": [list(t or []) for t in first["top_logprobs"]]}
    assert torch.allclose(
        torch.tensor(one["logprobs"]["token_logprobs"][1:]), torch.tensor(first["token_logprobs"][1:]), atol=1e-5
    )
    single = by_text["choices"][2]["logprobs"]  # a one-token prompt: only its null first entry, then the samples
    assert single["token_logprobs"][0] is None and len(single["tokens"]) == 1 + 3


def test_sampled_tokens_logprobs_are_the_models_raw_log_softmax(model_and_dir, http):
    """temperature 0.7 and top_p 0.9 shape the draw, not the numbers: each is the model's log-softmax at that step."""
    model, tok, _ = model_and_dir
    prompt = "ROMEO: "
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0.7, "top_p": 0.9, "seed": 3, "logprobs": 3, "n": 2}
    r = post(http, body)
    for choice in r["choices"]:
        lp = choice["logprobs"]
        n = len(lp["tokens"])
        # the end-of-text token that ends a choice is its last entry (as vLLM), though not in the text
        assert (lp["tokens"][-1] == "<|endoftext|>") == (choice["finish_reason"] == "stop")
        assert "".join(lp["tokens"]).removesuffix("<|endoftext|>") == choice["text"]
        assert lp["text_offset"] == list(range(len(prompt), len(prompt) + n))  # counted from the prompt's start
        ids = tok.encode(prompt + choice["text"]) + ([tok.eos_id] if lp["tokens"][-1] == "<|endoftext|>" else [])
        expected = own_logprobs(model, ids)[len(prompt) - 1 :]
        got = torch.tensor(lp["token_logprobs"])
        want = expected.gather(1, torch.tensor(ids[len(prompt) :])[:, None])[:, 0]
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
        for t, top in enumerate(lp["top_logprobs"]):
            values, indices = expected[t].topk(3)
            for i, v in zip(indices.tolist(), values.tolist()):
                assert abs(top[tok.decode([i], skip_special_tokens=False)] - v) < 1e-5
            assert len(top) == 3 or (len(top) == 4 and lp["tokens"][t] not in list(top)[:3])
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "stop"]  # (seed 3): both endings are checked
    assert r["usage"]["completion_tokens"] == sum(len(c["text"]) for c in r["choices"])
    # the same seed without logprobs draws the same text: recording the numbers changes nothing
    body.pop("logprobs")
    assert [c["text"] for c in post(http, body)["choices"]] == [c["text"] for c in r["choices"]]


def test_streamed_logprobs_add_up_to_the_whole_answer(http):
    body = {"prompt": "Good morrow", "echo": True, "logprobs": 2, "max_tokens": 12, "temperature": 0, "stop": "QQ"}
    whole = post(http, body)["choices"][0]
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in c["logprobs"][key]] == whole["logprobs"][key], key


def test_chat_logprobs(model_and_dir, server):
    model, tok, _ = model_and_dir
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Speak, good sir."}]
    r = client.chat.completions.create(
        model="m", messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=4
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    assert "".join(c.token for c in content).startswith(r.choices[0].message.content)
    prompt = "User: Speak, good sir.\nAssistant:"  # the plain chat template (gpt/chat.py)
    ids = tok.encode(prompt + "".join(c.token for c in content))
    expected = own_logprobs(model, ids)[len(prompt) - 1 :]
    for t, c in enumerate(content):
        assert c.bytes == list(c.token.encode()) and abs(c.logprob - float(expected[t, ids[len(prompt) + t]])) < 1e-5
        values, indices = expected[t].topk(4)
        assert [x.token for x in c.top_logprobs] == [
            tok.decode([i], skip_special_tokens=False) for i in indices.tolist()
        ]
        assert all(abs(x.logprob - v) < 1e-5 for x, v in zip(c.top_logprobs, values.tolist()))
        assert c.token == c.top_logprobs[0].token  # greedy: the likeliest
    bare = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0, logprobs=True)
    assert [len(c.top_logprobs) for c in bare.choices[0].logprobs.content] == [0, 0, 0]
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=3).choices[0].logprobs is None


def test_refusals_are_openai_400s(http):
    chat = "/v1/chat/completions"
    messages = [{"role": "user", "content": "Hi"}]
    cases = [  # (route, body, param, words in the message)
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
        ("/v1/completions", {"prompt": [1, 61]}, "prompt", "token id 61, outside the vocabulary (0 to 60)"),
        ("/v1/completions", {"prompt": [[1], [-1]]}, "prompt", "prompt[1] holds token id -1"),
        ("/v1/completions", {"prompt": [[1], []]}, "prompt", "prompt[1] is an empty list of token ids"),
        ("/v1/completions", {"prompt": [1] * 65}, "prompt", "65 tokens but the model's context is 64"),
        ("/v1/completions", {"prompt": [True]}, "prompt", "list of token ids (integers)"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "0 only with echo: true"),
        ("/v1/completions", {"prompt": "a", "echo": 1}, "echo", "valid boolean"),
        (chat, {"messages": messages, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        (chat, {"messages": messages, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal"),
        (chat, {"messages": messages, "logprobs": 5}, "logprobs", "valid boolean"),
        (chat, {"messages": messages, "echo": True}, "echo", "Extra inputs"),
    ]
    for route, body, param, words in cases:
        r = http.post(route, json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["param"] == param and words in error["message"] and "\n" not in error["message"], (body, error)
    assert post(http, {"prompt": [1, 2], "max_tokens": 1})["usage"]["completion_tokens"] == 1  # still serving


MC_DOCS = [  # a multiple-choice task of 8 documents, in the char-level model's alphabet
    {"question": q, "choices": ["yes", "no", "perhaps so"], "answer": i % 3}
    for i, q in enumerate(
        [
            "Art thou well?",
            "Is it day?",
            "Wilt thou go?",
            "Dost thou know?",
            "Is he there?",
            "Hast thou eaten?",
            "Shall we dance?",
            "Is this the end?",
        ]  # fmt: skip
    )
]


def test_lm_eval_local_completions_through_the_server(model_and_dir, server, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model (token-id prompts, echo, max_tokens 1, logprobs 1) scores
    a local multiple-choice task through the server; every loglikelihood is the model's own sum over the
    continuation's tokens, and acc is what those numbers imply."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok, model_dir = model_and_dir
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the bearer token
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={server}/v1/completions,model=m,tokenizer_backend=huggingface,tokenizer={model_dir},"
            "max_length=65,batch_size=4"
        ),
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(MC_DOCS)
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        lls = []
        for (context, continuation), (ll, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            ctx, whole = tok.encode(context), tok.encode(context + continuation)
            logp = own_logprobs(model, whole)[len(ctx) - 1 :]
            cont = torch.tensor(whole[len(ctx) :])
            want = float(logp.gather(1, cont[:, None]).sum())
            assert abs(ll - want) < 1e-4, (context, continuation, ll, want)
            assert greedy == bool((logp.argmax(-1) == cont).all())
            lls.append(want)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == MC_DOCS[sample["doc_id"]]["answer"])
        assert sample["acc"] == float(lls.index(max(lls)) == MC_DOCS[sample["doc_id"]]["answer"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))


def test_byte_level_tokens_are_spelled_as_openai_does_and_offsets_count_whole_characters():
    """A byte-level BPE token that is part of a character reads `bytes:\\xNN`; text_offset moves once it is whole."""
    from gpt.logprobs import Offsets, Spelling, completion_logprobs

    tok = Tokenizer.train_bpe(iter([["plain ascii text only"]]), vocab_size=260, show_progress=False)
    ids = tok.encode("a\u00e9 b")  # é is two bytes, c3 a9, each its own token (no merge learned them)
    spelling = Spelling(tok)
    assert [spelling.token(i) for i in ids] == ["a", "bytes:\\xc3", "bytes:\\xa9", " ", "b"]
    assert [spelling.bytes(i) for i in ids] == [[97], [0xC3], [0xA9], [32], [98]]
    assert spelling.token(tok.eos_id) == "<|endoftext|>" and spelling.text(tok.eos_id) == b""
    entries = [(i, -1.0, [i], [-1.0]) for i in ids + [tok.eos_id]]
    lp = completion_logprobs(spelling, entries, Offsets(3))
    assert lp["text_offset"] == [3, 4, 4, 5, 6, 7]  # é starts at 4 and is one character; the end token adds none
    assert lp["top_logprobs"][1] == {"bytes:\\xc3": -1.0}
