"""An OpenAI-compatible HTTP server: `python -m gpt.serve ckpt=<model dir> [adapter=<dir>] [port=8000]`.

Routes: GET /v1/models and /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (chat template:
gpt/chat.py), POST /tokenize and /detokenize (vLLM's), GET /metrics (Prometheus: gpt/metrics.py), GET /health,
and GET / (a chat page for the browser: gpt/static/chat.html). FastAPI + uvicorn run in one process; one
background thread, the engine (gpt/engine.py), owns the model and batches the requests continuously (reusing the
keys and values of prompts that start alike: gpt/prefixcache.py); `logprobs` / `echo` answers are built by
gpt/logprobs.py; a request's fields are checked and made into the engine's jobs by gpt/intake.py. Backpressure: at
most max_waiting choices wait for a row (more: 429), and a request ends by request_timeout (504). Docs:
docs/serve.md.
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
    Sampling,
    TokenizeRequest,
    internal_error,
    sse,
    text_field,
    top_logprobs,
    validation_error,
)
from gpt.chat import chat_template
from gpt.devices import check_dtype
from gpt.engine import Score
from gpt.errors import GPTError, is_int, is_number
from gpt.generate import check_sampling_args
from gpt.inference import load_for_sampling
from gpt.intake import Server
from gpt.logprobs import ChoiceLogprobs
from gpt.model import GPT

# ----------------------------------------------------------------------------------------------------
# The routes (their request shapes, errors and middleware: gpt/api.py; what they share and how a request becomes
# the engine's jobs: gpt/intake.py)


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
