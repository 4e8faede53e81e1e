"""An OpenAI-compatible HTTP server: `python -m gpt.serve ckpt=<model dir> [adapter=<dir>] [port=8000]`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (chat template: gpt/chat.py),
GET /health, and GET / (a chat page for the browser: gpt/static/chat.html). FastAPI + uvicorn run in one process;
one background thread, the engine (gpt/engine.py), owns the model and batches the requests continuously (reusing
the keys and values of prompts that start alike: gpt/prefixcache.py); `logprobs` / `echo` answers are built by
gpt/logprobs.py. Docs: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.resources
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
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Guard,
    Sampling,
    internal_error,
    sse,
    text_field,
    top_logprobs,
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
            top_k=cfg.top_k,
            stop_at_eos=cfg.stop_at_eos,
            max_batch_size=cfg.max_batch_size,
            batch_window_s=cfg.batch_window_ms / 1000,
            prefix_cache=PrefixCache(prefix, cfg.prefix_cache_block) if prefix else None,
        )

    def encode(self, text: str, param: str) -> list[int]:
        try:
            ids = encode_prompt(self.tokenizer, text, self.strict)
        except GPTError as e:
            raise APIError(400, str(e), param, "invalid_value") from None
        return self.fits(ids, param)

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
        vocab = self.tokenizer.vocab_size
        if not ids:
            raise APIError(
                400, f"{what} is an empty list of token ids: give at least one token", "prompt", "invalid_value"
            )
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"{what} holds token id {bad}, outside the vocabulary (0 to {vocab - 1}): send this model's token ids",
                "prompt",
                "invalid_value",
            )
        return self.fits(ids, "prompt")

    def check(self, body: Sampling, count: int) -> None:
        """What a request of `count` prompts asks for, checked before any text is read: n, n times the prompts
        (every choice is a row of the batch: one request must not queue unbounded work), the stop strings."""
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

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": server.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "gpt",
                    "context_length": server.block,
                }
            ],
        }

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
        messages = [
            {"role": m.role, "content": text_field(m.content, f"messages[{i}].content", "messages")}
            for i, m in enumerate(body.messages)
        ]
        try:
            text = server.template(messages)
        except GPTError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        prompts = [server.encode(text, "messages")]
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await respond(request, body, prompts, given, param, server.template.stops, chat=True)

    async def respond(request: Request, body: Sampling, prompts, max_tokens, param, stops, chat: bool, texts=None):
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

        def cancel():
            if len(finished) < len(work):
                server.engine.cancel(work)

        async def watch():
            # The client's disconnect, seen the moment it happens, however busy the stream of events is: the
            # request's jobs are cancelled at once (waiting ones leave the queue, running ones the batch at the
            # next step), and the reader wakes up (None). Guard has replayed the body already; what `receive`
            # brings now is http.disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel()
            events.put_nowait(None)

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
                try:
                    while len(work) > len(jobs) and -1 not in finished:  # echo's scores come first
                        item = await events.get()
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
                        item = early.popleft() if early else await events.get()
                        if item is None:  # the client is gone
                            return
                        k, event = item
                        if event[0] == "delta":
                            sent[k] += len(event[2])
                            yield sse(chunk(k, event[1], None, logprobs.part(k, event[2])))
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
                finally:  # also when the client disconnected: its rows leave the batch at the next step
                    watcher.cancel()
                    cancel()

            return StreamingResponse(
                stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        outs, reasons, entries = [""] * count, ["length"] * count, [[] for _ in range(count)]
        try:
            while len(finished) < len(work):
                item = await events.get()
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
        finally:
            watcher.cancel()
            cancel()
        outs = [texts[k // n] + outs[k] if echo else outs[k] for k in range(count)]
        choices = [choice(k, outs[k], reasons[k], logprobs.whole(k, entries[k])) for k in range(count)]
        return {**head, "choices": choices, "usage": totals()}

    api_key = cfg.api_key or os.environ.get("GPT_API_KEY") or None
    return Guard(app, api_key, cfg.max_body_bytes)


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
    positive = {key: cfg[key] for key in ("max_batch_size", "max_n", "max_choices", "max_body_bytes")}
    positive.update({key: cfg[key] for key in ("max_tokens", "threads") if cfg[key] is not None})  # null: default
    for key, value in positive.items():
        if not is_int(value) or value < 1:
            raise GPTError(f"{key} must be a positive integer (got {value!r})")
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
