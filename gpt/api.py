"""The HTTP API's shapes and its outermost layer, for gpt/serve.py: OpenAI's request fields (strict: an unknown
field or a wrong-typed value is a 400; a field we cannot act on is a 400 naming it), OpenAI's error body for every
error (4xx and 5xx alike), and `Guard`, the ASGI middleware in front of every route (CORS when enabled, API key,
body size limit, the request metrics, and a last net that turns any exception into a JSON 500, so no plain-text
error ever leaves the server).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Annotated, Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.middleware.cors import CORSMiddleware

from gpt.errors import GPTError
from gpt.textfiles import user_text


class Strict(BaseModel):
    # A misspelt or unknown field, or a value of the wrong type ("5" for 5), is an error, never ignored. A field
    # sent as null is a field left out, as OpenAI reads it (its SDKs send explicit nulls).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def null_is_left_out(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Strict):
    include_usage: bool = False  # one more chunk before [DONE], with the usage counts
    include_obfuscation: bool = False  # OpenAI pads chunks against side channels; ours are sent as they are


Bias = Annotated[float, Field(ge=-100, le=100)]


class Sampling(Strict):
    model: Optional[str] = None  # one model is served: any name is answered by it
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)  # OpenAI's: minus count x this, over the generated tokens
    presence_penalty: float = Field(0.0, ge=-2, le=2)  # OpenAI's: minus this for a token generated at least once
    logit_bias: dict[str, Bias] = {}  # token id (a string, as JSON keys are) -> added to its logit
    user: Optional[str] = None  # the end user, for the caller's own bookkeeping: no effect on the answer
    # vLLM's extensions (null: the server's default, configs/serve.yaml)
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0: no top-k filter
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)  # HF's, over the prompt's and the generated tokens
    # What OpenAI's SDKs may send that this server cannot do: refused by name (unsupported()) unless neutral.
    service_tier: Optional[str] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text(s), or token ids (lm-evaluation-harness)
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # each token's logprob and its `logprobs` likeliest rivals
    echo: bool = False  # the prompt comes first in the text (and in logprobs, scored by a full forward)
    best_of: Optional[int] = Field(None, ge=1)  # only n (no extra candidates to rank)
    suffix: Optional[str] = None  # insertion: only ""

    @field_validator("logprobs", mode="before")
    @classmethod
    def false_is_none(cls, value):  # "logprobs": false (some clients' way of saying none) is null
        return None if value is False else value


class ContentPart(Strict):
    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: Optional[str] = None
    refusal: Optional[str] = None
    image_url: Optional[dict] = None
    input_audio: Optional[dict] = None
    file: Optional[dict] = None


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None  # null: an assistant message only
    name: Optional[str] = None  # the speaker's name: a Jinja chat template gets it; the plain one shows none
    # tools (refused by name unless empty)
    tool_calls: Optional[list] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[dict] = None
    refusal: Optional[str] = None  # an earlier assistant message's refusal: kept as its text when it has no content
    audio: Optional[dict] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)  # needs logprobs: true
    # the answer is the same whatever these say (bookkeeping, caching hints)
    metadata: Optional[dict[str, str]] = None
    store: bool = False
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    # refused by name unless neutral (unsupported())
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    functions: Optional[list] = None
    function_call: Union[str, dict, None] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict] = None
    prediction: Optional[dict] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict] = None


# Fields this server cannot act on: the values that ask for nothing (accepted), and why any other is refused.
UNSUPPORTED = {
    "service_tier": (("auto", "default"), "one tier of service: send auto or default"),
    "best_of": ((None,), "no extra candidates to rank: best_of must equal n"),
    "suffix": (("",), "no insertion (text after the completion)"),
    "store": ((False,), "nothing is stored"),
    "response_format": (({"type": "text"},), 'no JSON mode or structured outputs: send {"type": "text"}'),
    "tools": (([],), "no function calling"),
    "tool_choice": (("none", "auto"), "no function calling: send none or auto"),
    "functions": (([],), "no function calling"),
    "function_call": (("none", "auto"), "no function calling: send none or auto"),
    "modalities": ((["text"],), 'text only: send ["text"]'),
    "audio": ((), "text only"),
    "prediction": ((), "no predicted outputs"),
    "reasoning_effort": ((), "not a reasoning model"),
    "verbosity": ((), "not a model with verbosity levels"),
    "web_search_options": ((), "no web search"),
}


def unsupported(body: BaseModel) -> None:
    """A 400 naming the first field that asks for what this server cannot do (fields left out, or null, pass)."""
    n = getattr(body, "n", 1)
    for name, (neutral, why) in UNSUPPORTED.items():
        if name not in body.model_fields_set:
            continue
        value = getattr(body, name)
        if value in neutral or (name == "best_of" and value == n):
            continue
        raise APIError(
            400,
            f"{name}={json.dumps(value)} is not supported by this server ({why}); leave {name} out",
            name,
            "unsupported_value",
        )


class TokenizeRequest(Strict):  # vLLM's POST /tokenize: a prompt, or messages rendered by the chat template
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_generation_prompt: bool = True  # messages: end with the assistant's turn, as /v1/chat/completions does
    add_special_tokens: bool = True  # our tokenizers add none to a text: true and false read alike
    return_token_strs: bool = False  # also each token as the logprobs spell it


class DetokenizeRequest(Strict):
    model: Optional[str] = None
    tokens: list[int]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def top_logprobs(body: Sampling) -> Optional[int]:
    """How many likeliest tokens a request wants with each token's logprob; None: no logprobs at all."""
    if getattr(body, "echo", None) is not None:  # completions: logprobs is that number, or null
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true; send both", "top_logprobs", "invalid_value")
    return (body.top_logprobs or 0) if body.logprobs else None


def validation_error(exc: RequestValidationError) -> APIError:
    error = exc.errors()[0]
    loc = [str(x) for x in error.get("loc", ()) if x != "body"]
    if error.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})")
    if error.get("type") == "model_attributes_type" or not loc:
        return APIError(400, "the request body must be a JSON object with the request's fields")
    if loc[0] == "prompt" and error.get("type") != "missing":  # a union: pydantic names the member tried last
        return APIError(
            400,
            "prompt must be a string, a list of strings, a list of token ids (integers) or a list of such lists",
            "prompt",
            "invalid_value",
        )
    param = ".".join(loc)
    message = f"{param}: {error['msg']}" + (
        f" (got {error['input']!r})"
        if error.get("type") != "missing" and not isinstance(error.get("input"), (dict, list))
        else ""
    )
    return APIError(400, message, param, "unknown_field" if error.get("type") == "extra_forbidden" else "invalid_value")


PUBLIC = ("/", "/health")  # the routes that need no API key: the chat page (its requests carry the key typed in
# it) and the health check


class Guard:
    """ASGI middleware in front of every route: CORS (Starlette's CORSMiddleware, when `cors_origins` is a list:
    outside the key check, so that a browser's preflight, which carries no credentials, is answered, and an error
    carries the CORS headers a page needs to read it), the API key (all but PUBLIC), the body size limit, the
    request metrics (`metrics.answered`), and the last net for exceptions (a JSON 500; FastAPI's own handler
    answers first, then re-raises to here)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, cors_origins=None, metrics=None):
        self.app, self.api_key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics
        self.entry = self.guard
        if cors_origins is not None:
            self.entry = CORSMiddleware(
                self.guard,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],  # Authorization, Content-Type, and what the OpenAI SDKs add (x-stainless-*)
                expose_headers=["Retry-After"],  # a 429's, for a page to read
            )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, start = False, "disconnected", time.monotonic()  # (no answer began: the client left)

        async def watched(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            await self.entry(scope, receive, watched)
        except Exception as e:  # a bug anywhere below: logged here, answered in OpenAI's shape if not yet answered
            logging.getLogger("uvicorn.error").exception("error while answering %s %s", scope["method"], scope["path"])
            if not started:
                await internal_error(e).response()(scope, receive, watched)
        finally:
            if self.metrics is not None:
                self.metrics.answered(scope, status, time.monotonic() - start)

    async def guard(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                error = APIError(
                    401,
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                return await error.response()(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than max_body_bytes={self.limit}", code="body_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_large.response()(scope, receive, send)
        # Read the body here (it is small), counting, so that a chunked body cannot exceed the limit either.
        messages, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.limit:
                    return await too_large.response()(scope, receive, send)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


def internal_error(e: BaseException) -> APIError:
    """The 500 for an exception nobody expected (a bug), in OpenAI's shape, on one line."""
    detail = " ".join(f"{type(e).__name__}: {e}".split())
    return APIError(
        500, f"the server failed on this request ({detail}); this is a bug: please report it", kind="server_error"
    )


def text_field(text: str, what: str, param: str) -> str:
    """A text field under the text rule (gpt.textfiles.user_text): CRLF read as LF, a leading BOM dropped, a
    lone surrogate ("\\ud800" in the JSON) refused with 400 naming the field."""
    try:
        return user_text(text, what)
    except GPTError as e:
        raise APIError(400, str(e), param, "invalid_value") from None


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"
