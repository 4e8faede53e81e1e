"""An OpenAI-compatible HTTP server: `python -m gpt.serve ckpt=<model dir> [adapter=<dir>] [port=8000]`.

Routes: GET /v1/models and /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (chat template:
gpt/chat.py), POST /tokenize and /detokenize (vLLM's), GET /metrics (Prometheus: gpt/metrics.py), GET /health,
and GET / (a chat page for the browser: gpt/static/chat.html). FastAPI + uvicorn run in one process; one
background thread, the engine (gpt/engine.py), owns the model and batches the requests continuously (reusing the
keys and values of prompts that start alike: gpt/prefixcache.py); `logprobs` / `echo` answers are built by
gpt/logprobs.py. Backpressure: at most max_waiting choices wait for a row (more: 429), and a request ends by
request_timeout (504). Docs: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
import math
import os
import secrets
import signal
import sys
import threading
import time
from typing import Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from omegaconf import ListConfig
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Guard,
    Message,
    Sampling,
    TokenizeRequest,
    internal_error,
    sse,
    text_field,
    top_logprobs,
    unsupported,
    validation_error,
)
from gpt.chat import ChatTemplate, chat_template
from gpt.completions import encode_prompt
from gpt.devices import check_dtype
from gpt.engine import Engine, Job, Score
from gpt.errors import GPTError, is_int, is_number
from gpt.generate import check_sampling_args
from gpt.inference import load_for_sampling
from gpt.logprobs import ChoiceLogprobs, Spelling
from gpt.metrics import Metrics
from gpt.model import GPT
from gpt.prefixcache import PrefixCache

# ----------------------------------------------------------------------------------------------------
# The routes (their request shapes, errors and middleware: gpt/api.py)


class Server:
    """What the routes share: the model's tokenizer and limits, the engine, the defaults from the config."""

    def __init__(self, cfg, model: GPT, tokenizer, template: ChatTemplate):
        self.cfg, self.tokenizer, self.template = cfg, tokenizer, template
        self.block = model.config.block_size
        self.device = next(model.parameters()).device
        self.name = cfg.get("model_name") or str(cfg.get("adapter") or cfg.get("ckpt"))
        self.created = int(time.time())
        self.strict = cfg.unknown_chars == "error"
        self.spelling = Spelling(tokenizer)
        prefix = cfg.prefix_cache_tokens
        self.engine = Engine(
            model,
            tokenizer,
            stop_at_eos=cfg.stop_at_eos,
            max_batch_size=cfg.max_batch_size,
            batch_window_s=cfg.batch_window_ms / 1000,
            prefix_cache=PrefixCache(prefix, cfg.prefix_cache_block) if prefix else None,
        )
        self.load = 0  # choices (and echo scorings) admitted and not yet answered; touched by the event loop only
        self.metrics = Metrics([], lambda: len(self.engine.rows), self.engine.waiting.qsize)

    def admit(self, count: int) -> None:
        """Backpressure: `count` more choices, unless the server already holds work and they would make more than
        max_waiting wait for a row: then 429, with Retry-After. An idle server takes any request (max_choices
        bounds one), so that no valid request is refused for ever."""
        room = self.cfg.max_batch_size + self.cfg.max_waiting
        if self.load and self.load + count > room:
            self.metrics.rejected.inc()
            raise APIError(
                429,
                f"the server is full: {self.load} choices are running or waiting (max_batch_size="
                f"{self.cfg.max_batch_size} + max_waiting={self.cfg.max_waiting}) and this request adds {count}; "
                "retry after the Retry-After header's seconds",
                code="rate_limit_exceeded",
                kind="requests",
                headers={"Retry-After": "1"},
            )
        self.load += count

    def encode(self, text: str, param: str, fit: bool = True) -> list[int]:
        try:
            ids = encode_prompt(self.tokenizer, text, self.strict)
        except GPTError as e:
            raise APIError(400, str(e), param, "invalid_value") from None
        return self.fits(ids, param) if fit else ids

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages`: each content a string or text parts (joined by newlines, as
        vLLM does), `developer` read as `system`, `name` passed to a Jinja template; what we cannot read
        (images, audio, files, tool calls) refused by name."""
        turns = []
        for i, m in enumerate(messages):
            at = f"messages[{i}]"
            tools = m.role in ("tool", "function") or m.tool_calls or m.function_call or m.tool_call_id is not None
            if tools or m.audio is not None:
                what = f"a {m.role} message" if m.role in ("tool", "function") else "a message with tool calls or audio"
                raise APIError(
                    400,
                    f"{at} is {what}: this server does no function calling and reads text only; leave it out",
                    "messages",
                    "unsupported_value",
                )
            content = m.content if m.content is not None else m.refusal
            if content is None:
                if m.role != "assistant":
                    raise APIError(400, f"{at}.content is missing: a {m.role} message needs content", "messages")
                content = ""  # an assistant message without content (OpenAI's, beside tool calls)
            if isinstance(content, list):
                pieces = []
                for j, part in enumerate(content):
                    text = part.text if part.type == "text" else part.refusal if part.type == "refusal" else None
                    if part.type not in ("text", "refusal"):
                        raise APIError(
                            400,
                            f"{at}.content[{j}] is an {part.type} part: this model reads text only; send text parts",
                            "messages",
                            "unsupported_value",
                        )
                    if text is None:
                        raise APIError(
                            400, f"{at}.content[{j}] is a {part.type} part without its {part.type} field", "messages"
                        )
                    pieces.append(text)
                content = "\n".join(pieces)
            turn = {"role": "system" if m.role == "developer" else m.role}
            turn["content"] = text_field(content, f"{at}.content", "messages")
            if m.name is not None:
                turn["name"] = text_field(m.name, f"{at}.name", "messages")
            turns.append(turn)
        try:
            return self.template(turns, add_generation_prompt)
        except GPTError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None

    def fits(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.block:
            raise APIError(
                400,
                f"{param} is {len(ids)} tokens but the model's context is {self.block}: shorten it",
                param,
                "context_length_exceeded",
            )
        return ids

    def token_ids(self, ids: list[int], what: str) -> list[int]:
        """A prompt given as token ids (as lm-evaluation-harness sends them): each one of the tokenizer's."""
        if not ids:
            raise APIError(
                400, f"{what} is an empty list of token ids: give at least one token", "prompt", "invalid_value"
            )
        return self.fits(self.known(ids, what, "prompt"), "prompt")

    def known(self, ids: list[int], what: str, param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"{what} holds token id {bad}, outside the vocabulary (0 to {vocab - 1}): send this model's token ids",
                param,
                "invalid_value",
            )
        return ids

    def logit_bias(self, bias: dict[str, float]) -> dict[int, float]:
        """logit_bias's keys as token ids (JSON keys are strings): each one of the tokenizer's."""
        vocab, out = self.tokenizer.vocab_size, {}
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit() and int(key) < vocab):
                raise APIError(
                    400,
                    f"logit_bias key {key!r} is not a token id of this model: keys are token ids, 0 to {vocab - 1}, "
                    'written as strings ({"15": -100}); POST /tokenize gives a text\'s ids',
                    "logit_bias",
                    "invalid_value",
                )
            out[int(key)] = value
        return out

    def check(self, body: Sampling, count: int) -> None:
        """What a request of `count` prompts asks for, checked before any text is read: what we cannot do (by
        name), stream_options without a stream, n, n times the prompts (every choice is a row of the batch: one
        request must not queue unbounded work), the stop strings."""
        unsupported(body)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options", "invalid_value")
        if body.n > self.cfg.max_n:
            raise APIError(
                400, f"n must be at most {self.cfg.max_n} (the server's max_n; got {body.n})", "n", "invalid_value"
            )
        if count * body.n > self.cfg.max_choices:
            raise APIError(
                400,
                f"{count} prompts x n={body.n} is {count * body.n} choices, more than the server's "
                f"max_choices={self.cfg.max_choices}; send fewer prompts or a smaller n per request",
                "n" if count == 1 else "prompt",
                "invalid_value",
            )
        given = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(given) > 4 or any(not s for s in given):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop", "invalid_value")
        for s in given:
            text_field(s, "stop", "stop")  # (refuses a lone surrogate; a stop string is matched as given)

    def jobs(
        self, body: Sampling, prompts: list[list[int]], max_tokens: Optional[int], param: str, stops: list[str], send
    ) -> list[Job]:
        """Job i * n + j: choice j of prompt i (OpenAI's choice index). None at all for max_tokens 0 with echo: the
        prompt's scores only, no tokens to sample."""
        echo = getattr(body, "echo", False)
        if max_tokens == 0 and echo:
            return []
        if max_tokens is not None and not 0 < max_tokens <= self.block:
            raise APIError(
                400,
                f"{param} must be between 1 and the model's context, {self.block} (got {max_tokens})"
                + ("; 0 only with echo: true, to score the prompt" if max_tokens == 0 else ""),
                param,
                "invalid_value",
            )
        given = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = self.cfg.temperature if body.temperature is None else body.temperature
        top_p = self.cfg.top_p if body.top_p is None else body.top_p
        top_k = self.cfg.top_k if body.top_k is None else (body.top_k if body.top_k > 0 else None)
        min_p = self.cfg.min_p if body.min_p is None else body.min_p
        repetition = self.cfg.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
        bias = self.logit_bias(body.logit_bias)
        seed = body.seed if body.seed is not None else self.cfg.seed
        if seed is None:
            seed = secrets.randbits(63)
        jobs = []
        for ids in prompts:
            for j in range(body.n):
                k = len(jobs)
                limit = max_tokens or self.cfg.max_tokens or self.block
                generator = None
                if temperature > 0:  # choice 0 uses the seed itself, as sample.py does; the others their own streams
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(seed if k == 0 else (seed * 1_000_003 + k) % 2**63)
                jobs.append(
                    Job(
                        list(ids),
                        limit,
                        temperature,
                        top_p,
                        given + [s for s in stops if s not in given],
                        generator,
                        lambda event, k=k: send((k, event)),
                        logprobs=top_logprobs(body),
                        top_k=top_k,
                        min_p=min_p,
                        frequency_penalty=body.frequency_penalty,
                        presence_penalty=body.presence_penalty,
                        repetition_penalty=repetition,
                        logit_bias=bias,
                    )
                )
        return jobs


def create_app(cfg, model: Optional[GPT] = None, tokenizer=None) -> Guard:
    """The ASGI app for `cfg` (configs/serve.yaml); loads the model unless given one."""
    if model is None:
        model, tokenizer, _ = load_for_sampling(cfg)
    server = Server(cfg, model, tokenizer, chat_template(cfg))
    if cfg.max_tokens is not None and cfg.max_tokens > server.block:
        raise GPTError(
            f"max_tokens={cfg.max_tokens} is more than the model's context ({server.block}); "
            "lower it, or null: until the context is full"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="gpt", lifespan=lifespan)
    app.state.server = server
    server.metrics.routes = app.router.routes

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):  # answered in OpenAI's shape; Guard logs the traceback
        return internal_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return APIError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        ).response()

    page = (importlib.resources.files("gpt") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():  # no API key needed (gpt/api.py PUBLIC): the page sends the one typed into it
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": server.name,
            "running": len(server.engine.rows),
            "waiting": server.engine.waiting.qsize(),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)

    def card() -> dict:
        return {
            "id": server.name,
            "object": "model",
            "created": server.created,
            "owned_by": "gpt",
            "context_length": server.block,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")  # (:path: the default id is a directory's path, slashes and all)
    async def model_card(model: str):
        if model != server.name:
            raise APIError(
                404,
                f"The model '{model}' does not exist: this server serves '{server.name}' (GET /v1/models)",
                "model",
                "model_not_found",
            )
        return card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt (a text) or messages (a conversation), one of them", "prompt")
        if body.prompt is not None:
            text = text_field(body.prompt, "prompt", "prompt")
        else:
            text = server.render(body.messages, body.add_generation_prompt)
        ids = server.encode(text, "prompt" if body.prompt is not None else "messages", fit=False)
        strs = [server.spelling.token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": server.block, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": server.tokenizer.decode(server.known(body.tokens, "tokens", "tokens"))}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        one = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        texts = [body.prompt] if one else body.prompt
        if not texts:
            raise APIError(400, "prompt is an empty list: give a prompt", "prompt", "invalid_value")
        server.check(body, len(texts))
        what = ["prompt"] if len(texts) == 1 else [f"prompt[{i}]" for i in range(len(texts))]
        texts = [text_field(t, w, "prompt") if isinstance(t, str) else t for t, w in zip(texts, what)]
        prompts = [
            server.encode(t, "prompt") if isinstance(t, str) else server.token_ids(t, w) for t, w in zip(texts, what)
        ]
        texts = [t if isinstance(t, str) else server.tokenizer.decode(t) for t in texts]  # what echo shows
        return await respond(request, body, prompts, body.max_tokens, "max_tokens", [], chat=False, texts=texts)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        server.check(body, 1)
        prompts = [server.encode(server.render(body.messages), "messages")]
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await respond(request, body, prompts, given, param, server.template.stops, chat=True)

    class TimedOut(Exception):
        pass

    def timed_out() -> APIError:
        return APIError(
            504,
            f"the request ran past request_timeout={cfg.request_timeout} s and was cancelled: ask for fewer tokens, "
            "or retry when the server is less busy",
            code="timeout",
            kind="server_error",
        )

    async def respond(request: Request, body: Sampling, prompts, max_tokens, param, stops, chat: bool, texts=None):
        arrived = time.monotonic()
        deadline = None if cfg.request_timeout is None else arrived + cfg.request_timeout
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def send(event):  # from the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        jobs = server.jobs(body, prompts, max_tokens, param, stops, send)
        echo, n, count = not chat and body.echo, body.n, len(prompts) * body.n
        logprobs = ChoiceLogprobs(server.spelling, prompts, texts or [""], n, top_logprobs(body), echo, chat)
        seqs = logprobs.to_score()  # echo's prompts, scored by the engine (gpt/scoring.py); their events are -1's
        work = jobs + ([Score(seqs, logprobs.top or 0, lambda event: send((-1, event)))] if seqs else [])
        finished = set()  # the work that ended (done or error); the rest is cancelled when the client leaves
        server.admit(len(work))  # (429 when the queue is full; nothing runs yet)
        admitted = True

        def close():  # the request is over (answered, failed, timed out, or its client gone): free what it holds
            nonlocal admitted
            if len(finished) < len(work):
                server.engine.cancel(work)
            if admitted:
                admitted, server.load = False, server.load - len(work)

        async def watch():
            # The client's disconnect, seen the moment it happens, however busy the stream of events is: the
            # request's jobs are cancelled at once (waiting ones leave the queue, running ones the batch at the
            # next step), and the reader wakes up (None). Guard has replayed the body already; what `receive`
            # brings now is http.disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            close()
            events.put_nowait(None)

        untouched = True  # no token yet (time to first token)

        async def next_event():
            nonlocal untouched
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                item = await asyncio.wait_for(events.get(), left)
            except asyncio.TimeoutError:
                server.metrics.timeouts.inc()
                raise TimedOut from None
            if untouched and item is not None and item[0] >= 0 and item[1][0] in ("delta", "done"):
                untouched = False
                server.metrics.ttft.observe(time.monotonic() - arrived)
            if item is not None and item[0] >= 0 and item[1][0] == "done":
                server.metrics.completion_tokens.inc(item[1][2])
            return item

        server.engine.submit(work)
        watcher = asyncio.create_task(watch())
        kind = "chat.completion" if chat else "text_completion"
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
            "object": kind,
            "created": int(time.time()),
            "model": server.name,
        }
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        server.metrics.prompt_tokens.inc(usage["prompt_tokens"])

        def totals():  # the usage once every choice is done; cached_tokens: the prompts' prefix-cache hits (job
            # i * n is prompt i's first choice; a prompt is read once for its n)
            cached = sum(jobs[i * n].reused for i in range(len(prompts))) if jobs else 0
            total = usage["prompt_tokens"] + usage["completion_tokens"]
            return {**usage, "total_tokens": total, "prompt_tokens_details": {"cached_tokens": cached}}

        def choice(k, text, reason, lp):
            if chat:
                message = {"role": "assistant", "content": text}
                return {"index": k, "message": message, "logprobs": lp, "finish_reason": reason}
            return {"index": k, "text": text, "logprobs": lp, "finish_reason": reason}

        def chunk(k, text, reason, lp=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                c = {"index": k, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                c = {"index": k, "text": text, "logprobs": lp, "finish_reason": reason}
            return {**head, "object": kind + ".chunk" if chat else kind, "choices": [c]}

        if body.stream:

            async def stream():
                error = {"message": "", "type": "server_error", "param": None, "code": None}
                sent, early = [0] * count, collections.deque()  # entries sent per choice; events before the scores
                fresh = [chat] * count  # a chat choice whose text has not begun: its separator is still to strip
                try:
                    while len(work) > len(jobs) and -1 not in finished:  # echo's scores come first
                        item = await next_event()
                        if item is None:  # the client is gone
                            return
                        if item[0] >= 0:
                            early.append(item)
                            continue
                        finished.add(-1)
                        if item[1][0] == "error":
                            yield sse({"error": {**error, "message": item[1][1]}})
                            return
                        logprobs.set_scored(item[1][1])
                    for k in range(count):
                        if chat:
                            yield sse(chunk(k, "", None, first=True))
                        elif echo:
                            yield sse(chunk(k, texts[k // n], None, logprobs.part(k, logprobs.prompt(k))))
                        if not jobs:  # max_tokens 0: the prompt is all
                            yield sse(chunk(k, "", "length", logprobs.part(k, [])))
                    while len(finished) < len(work):
                        item = early.popleft() if early else await next_event()
                        if item is None:  # the client is gone
                            return
                        k, event = item
                        if event[0] == "delta":
                            text = event[1]
                            if fresh[k] and text:
                                text, fresh[k] = server.template.reply(text), False
                            sent[k] += len(event[2])
                            yield sse(chunk(k, text, None, logprobs.part(k, event[2])))
                        elif event[0] == "done":
                            usage["completion_tokens"] += event[2]
                            finished.add(k)
                            yield sse(chunk(k, "", event[1], logprobs.part(k, event[4][sent[k] :])))
                        else:
                            finished.add(k)
                            yield sse({"error": {**error, "message": event[1]}})
                            return
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse(
                            {**head, "object": kind + ".chunk" if chat else kind, "choices": [], "usage": totals()}
                        )
                    yield "data: [DONE]\n\n"
                except TimedOut:
                    yield sse(timed_out().body())
                finally:  # also when the client disconnected: its rows leave the batch at the next step
                    watcher.cancel()
                    close()

            return StreamingResponse(
                stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        outs, reasons, entries = [""] * count, ["length"] * count, [[] for _ in range(count)]
        try:
            while len(finished) < len(work):
                item = await next_event()
                if item is None:  # the client is gone: nobody reads the answer
                    return None
                k, event = item
                if event[0] == "error":
                    finished.add(k)
                    raise APIError(500, event[1], kind="server_error")
                if k < 0:
                    finished.add(k)
                    logprobs.set_scored(event[1])
                elif event[0] == "done":
                    reasons[k], outs[k], entries[k] = event[1], event[3], event[4]
                    usage["completion_tokens"] += event[2]
                    finished.add(k)
        except TimedOut:
            raise timed_out() from None
        finally:
            watcher.cancel()
            close()
        outs = [
            texts[k // n] + outs[k] if echo else server.template.reply(outs[k]) if chat else outs[k]
            for k in range(count)
        ]
        choices = [choice(k, outs[k], reasons[k], logprobs.whole(k, entries[k])) for k in range(count)]
        return {**head, "choices": choices, "usage": totals()}

    api_key = cfg.api_key or os.environ.get("GPT_API_KEY") or None
    return Guard(app, api_key, cfg.max_body_bytes, cfg.cors_origins, server.metrics)


# ----------------------------------------------------------------------------------------------------
# The command


def check_serve_options(cfg) -> None:
    """configs/serve.yaml's settings, checked before the model is loaded."""
    check_sampling_args(1, cfg.temperature, cfg.top_k, cfg.top_p)
    check_dtype(cfg.dtype)
    if cfg.temperature > 2:
        raise GPTError(f"temperature must be in [0, 2] (got {cfg.temperature}), as in OpenAI's API")
    if cfg.seed is not None and (not is_int(cfg.seed) or not 0 <= cfg.seed < 2**63):
        raise GPTError(f"seed must be null (a random seed per request) or an integer >= 0 (got {cfg.seed!r})")
    if not is_int(cfg.port) or not 0 <= cfg.port < 65536:
        raise GPTError(f"port must be a TCP port number, 0-65535 (got {cfg.port!r})")
    if cfg.min_p is not None and not (is_number(cfg.min_p) and 0 <= cfg.min_p <= 1):
        raise GPTError(f"min_p must be in [0, 1] or null (got {cfg.min_p!r})")
    if not is_number(cfg.repetition_penalty) or not 0 < cfg.repetition_penalty < math.inf:
        raise GPTError(f"repetition_penalty must be a number > 0 (got {cfg.repetition_penalty!r}); 1 = none")
    positive = {key: cfg[key] for key in ("max_batch_size", "max_n", "max_choices", "max_body_bytes")}
    positive.update({key: cfg[key] for key in ("max_tokens", "threads") if cfg[key] is not None})  # null: default
    for key, value in positive.items():
        if not is_int(value) or value < 1:
            raise GPTError(f"{key} must be a positive integer (got {value!r})")
    if not is_int(cfg.max_waiting) or cfg.max_waiting < 0:
        raise GPTError(f"max_waiting must be an integer >= 0 (got {cfg.max_waiting!r})")
    if not is_int(cfg.prefix_cache_block) or cfg.prefix_cache_block < 1:
        raise GPTError(f"prefix_cache_block must be a positive integer (got {cfg.prefix_cache_block!r})")
    if not is_int(cfg.prefix_cache_tokens) or not (
        cfg.prefix_cache_tokens == 0 or cfg.prefix_cache_tokens >= cfg.prefix_cache_block
    ):
        raise GPTError(
            f"prefix_cache_tokens must be 0 (no prefix cache) or at least prefix_cache_block={cfg.prefix_cache_block} "
            f"(got {cfg.prefix_cache_tokens!r})"
        )
    for key in ("batch_window_ms", "shutdown_timeout"):
        if not is_number(cfg[key]) or cfg[key] < 0:
            raise GPTError(f"{key} must be a number >= 0 (got {cfg[key]!r})")
    if cfg.request_timeout is not None and not (is_number(cfg.request_timeout) and cfg.request_timeout > 0):
        raise GPTError(f"request_timeout must be a number of seconds > 0, or null: none (got {cfg.request_timeout!r})")
    origins = cfg.cors_origins
    if origins is not None and (
        not isinstance(origins, ListConfig) or not all(isinstance(o, str) and o for o in origins)
    ):
        raise GPTError(
            f"cors_origins must be null (no CORS) or a list of origins, e.g. '[http://localhost:3000]' or '[\"*\"]' "
            f"(got {origins!r})"
        )
    if cfg.unknown_chars not in ("error", "unk"):
        raise GPTError(f"unknown_chars must be error or unk (got {cfg.unknown_chars!r})")


def serve(cfg, sockets=None) -> None:
    import uvicorn

    check_serve_options(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    app = create_app(cfg)
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=cfg.shutdown_timeout,
        access_log=cfg.access_log,
    )
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {cfg.host}, reachable from other machines"
            + ("" if app.api_key else " by anyone: set api_key= or GPT_API_KEY"),
            file=sys.stderr,
        )
    # uvicorn answers SIGTERM with a graceful shutdown (in-flight requests finish, at most shutdown_timeout
    # seconds) and then raises the signal again on the handler found before it; a no-op one makes that exit 0.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    from gpt.cli import run_hydra

    run_hydra("serve", serve)
