"""The chat page (GET /, gpt/static/chat.html) in a real browser: Debian's chromium, headless, driven by playwright.
What the page shows for a conversation typed into it must be what the server answers the same messages through
plain HTTP, greedy (temperature 0): nothing here depends on what the model emits. `make test-browser` (and CI)
installs chromium and runs these; `make test` leaves them out (marker `browser`)."""

import contextlib
import json
import os
import shutil

import httpx
import pytest
import torch
from playwright.sync_api import expect, sync_playwright
from test_serve import ALPHABET, KEY, running, serve_config

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.serve import create_app
from gpt.tokenizer import Tokenizer

pytestmark = pytest.mark.browser
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT_MS = 60_000  # for a reply on a busy 2-core machine; a few hundred ms normally


def chromium() -> str:
    path = os.environ.get("GPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "no chromium to drive: apt-get install chromium (make test-browser does), or set GPT_CHROMIUM=<path>"
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with room for a few turns (a context of 256 characters)."""
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: greedy choices are far from ties
        model.lm_head.weight.mul_(4)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("page") / "model")


def serve(model_dir, *settings):
    """The model served on a loopback port (a context manager yielding its url)."""
    cfg = serve_config(
        f"ckpt={model_dir}", "device=cpu", "dtype=float32", "stop_at_eos=false", "log_level=warning", *settings
    )
    return running(create_app(cfg))


@pytest.fixture(scope="module")
def server(model_dir):
    """Served with an API key."""
    with serve(model_dir, f"api_key={KEY}") as url:
        yield url


@contextlib.contextmanager
def opened(url):
    """The chat page at `url`, opened in a fresh headless chromium; `page.sent` collects the bodies of its chat
    requests and `page.types` the content types of their answers."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page()
            page.sent, page.types = [], []
            chat = url + "/v1/chat/completions"
            page.on("request", lambda r: page.sent.append(json.loads(r.post_data)) if r.url == chat else None)
            page.on("response", lambda r: page.types.append(r.headers.get("content-type")) if r.url == chat else None)
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(server):
    with opened(server) as page:
        yield page


def say(page, text: str):
    """Type a message, send it with Enter; the reply's element once it has ended (done, or error)."""
    n = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".message.assistant").nth(n)
    expect(reply).not_to_have_attribute("data-state", "streaming", timeout=WAIT_MS)
    return reply


def api(server, messages, max_tokens):
    """The server's answer to the same messages through plain HTTP (not streamed), greedy."""
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_a_conversation_on_the_page_is_what_the_api_answers(server, page):
    expect(page.locator("#key-row")).to_be_visible()  # the server asks for a key: the page shows the field
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # (change: the page asks for the model again, now with the key)
    expect(page.locator("#model")).to_contain_text("context 256 tokens")
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "20")

    first = say(page, "Hello there")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expect(first).to_have_attribute("data-state", "done")
    assert first.text_content() == api(server, conversation, 20)
    assert page.sent[-1] == {"messages": conversation, "stream": True, "temperature": 0, "max_tokens": 20}
    assert page.types[-1].startswith("text/event-stream")  # streamed, read as it came

    # the next turn sends the conversation so far
    second = say(page, "And who art thou?")
    conversation += [
        {"role": "assistant", "content": first.text_content()},
        {"role": "user", "content": "And who art thou?"},
    ]
    expect(second).to_have_attribute("data-state", "done")
    assert second.text_content() == api(server, conversation, 20) and page.sent[-1]["messages"] == conversation

    # reset: an empty page, and a new conversation (the same first message gets the same reply)
    page.click("#reset")
    expect(page.locator(".message")).to_have_count(0)
    again = say(page, "Hello there")
    assert page.sent[-1]["messages"] == conversation[:2] and again.text_content() == first.text_content()


def test_errors_show_on_the_page_and_leave_the_conversation_as_it_was(server, page):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "5")
    refused = say(page, "Hi")  # no key yet: the server's 401, in words
    expect(refused).to_have_attribute("data-state", "error")
    assert "missing or wrong API key" in refused.text_content()
    page.fill("#api-key", KEY)
    page.fill("#temperature", "3")  # out of range: the server's 400, in words
    bad = say(page, "Hi")
    expect(bad).to_have_attribute("data-state", "error")
    assert "temperature" in bad.text_content() and "less than or equal to 2" in bad.text_content()
    page.fill("#temperature", "0")
    good = say(page, "Hi")  # the failed turns are not part of the conversation
    expect(good).to_have_attribute("data-state", "done")
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "Hi"}]
    assert good.text_content() == api(server, [{"role": "user", "content": "Hi"}], 5)


def test_a_server_without_a_key_gets_no_key_field(model_dir):
    with serve(model_dir) as url, opened(url) as page:
        expect(page.locator("#model")).to_contain_text("context 256 tokens")  # the page has asked /v1/models
        expect(page.locator("#key-row")).to_be_hidden()
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "5")
        reply = say(page, "Hi")
        expect(reply).to_have_attribute("data-state", "done")
        assert reply.text_content() == api(url, [{"role": "user", "content": "Hi"}], 5)
