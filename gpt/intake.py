"""What gpt/serve.py's routes share (`Server`), and their way from a request to the engine's jobs: the request's
fields checked (what this server cannot do refused by name, n and the choices it asks for, stop strings), chat
messages rendered as the SDKs send them, prompts encoded and fitted to the context, logit_bias's keys read as
token ids, each choice made an engine Job (gpt/engine.py) with its own sampling settings and random stream, and
backpressure: the choices admitted, a 429 past max_waiting. Docs: docs/serve.md.
"""

from __future__ import annotations

import secrets
import time
from typing import Optional

import torch

from gpt.api import APIError, Message, Sampling, text_field, top_logprobs, unsupported
from gpt.chat import ChatTemplate
from gpt.completions import encode_prompt
from gpt.engine import Engine, Job
from gpt.errors import GPTError
from gpt.logprobs import Spelling
from gpt.metrics import Metrics
from gpt.model import GPT
from gpt.prefixcache import PrefixCache


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
        running, waiting = (lambda: len(self.engine.rows)), self.engine.waiting.qsize
        self.metrics = Metrics([], running, waiting, self.engine.prefix_cache)

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
