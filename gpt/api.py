"""The HTTP API's shapes and its outermost layer, for gpt/serve.py: OpenAI's request fields (strict: an unknown
field or a wrong-typed value is a 400), OpenAI's error body for every error (4xx and 5xx alike), and `Guard`, the
ASGI middleware in front of every route (API key, body size limit, and a last net that turns any exception into
a JSON 500, so no plain-text error ever leaves the server).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Literal, Optional, Union

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.errors import GPTError
from gpt.textfiles import user_text


class Strict(BaseModel):
    # A misspelt or unknown field, or a value of the wrong type ("5" for 5), is an error, never ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False  # one more chunk before [DONE], with the usage counts


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


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text(s), or token ids (lm-evaluation-harness)
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # each token's logprob and its `logprobs` likeliest rivals
    echo: bool = False  # the prompt comes first in the text (and in logprobs, scored by a full forward)


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)  # needs logprobs: true


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


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
    """ASGI middleware in front of every route: the API key (all but PUBLIC), the body size limit, and the last
    net for exceptions (a JSON 500; FastAPI's own handler answers first, then re-raises to here)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.guard(scope, receive, watched)
        except Exception as e:  # a bug anywhere below: logged here, answered in OpenAI's shape if not yet answered
            logging.getLogger("uvicorn.error").exception("error while answering %s %s", scope["method"], scope["path"])
            if not started:
                await internal_error(e).response()(scope, receive, send)

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
