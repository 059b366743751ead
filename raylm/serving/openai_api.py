"""The OpenAI-compatible wire format: request models, strict JSON parsing, OpenAI-style errors and
response/chunk bodies. Pure Python (pydantic only), so it is unit-testable without a server."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raylm.errors import format_error

# C0 controls other than tab/newline/carriage return, and DEL: never meaningful in a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_STOP = 4


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _clean_text(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains control characters")
    return value


class _Request(BaseModel):
    # Strict: "0.5" is not a number and 1 is not a bool; unknown fields are refused, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, min_length=1, max_length=256)
    # None: 16 for completions (OpenAI's default), the server's limit for chat.
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=(1 << 63) - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            if any(not s for s in stops):
                raise ValueError("stop sequences must be non-empty")
        return stops

    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple."""
        return tuple(self.stop or ())


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return _clean_text(v, "prompt")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1 << 20)
    name: str | None = Field(None, max_length=64)

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        return _clean_text(v, "content")


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=256)
    # Newer OpenAI clients send this name for chat; it means the same as max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None:
                raise ValueError("give max_tokens or max_completion_tokens, not both")
            self.max_tokens = self.max_completion_tokens
        return self

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[Message]) -> list[Message]:
        if not any(m.role == "user" and m.content for m in v):
            raise ValueError("needs at least one non-empty user message")
        return v


MAX_INPUTS = 256


class LabelRequest(BaseModel):
    """`POST /v1/classify` and `/v1/ner`: one text or a list of texts (OpenAI's `input`, as in
    its moderation and embedding APIs)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, min_length=1, max_length=256)
    input: str | list[str]
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if not texts:
            raise ValueError("needs at least one text")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} texts per request")
        for text in texts:
            if not text.strip():
                raise ValueError("texts must not be empty")
            _clean_text(text, "input")
        return v

    def texts(self) -> list[str]:
        """The input as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, content_type: str | None, model: type[BaseModel]) -> Any:
    """Validates a request body as `model`; raises APIError(400/415) naming what is wrong."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"Content-Type must be application/json, got {content_type!r}",
            code="unsupported_media_type",
        )
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        param, message = format_error(errors[0], limit=60)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise APIError(400, message + more, param=param or None, code="invalid_value") from None


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `text_completion` response."""
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_body(
    model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` response."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def classify_body(model: str, labels: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    """A `/v1/classify` response: per text (in order) its label, score and all class scores."""
    return {
        "id": new_id("clf"),
        "object": "classification",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, **x} for i, x in enumerate(labels)],
        "usage": usage(prompt_tokens, 0),
    }


def ner_body(
    model: str, entities: list[list[dict[str, Any]]], prompt_tokens: int
) -> dict[str, Any]:
    """A `/v1/ner` response: per text (in order) its entities with character offsets."""
    return {
        "id": new_id("ner"),
        "object": "ner",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "entities": e} for i, e in enumerate(entities)],
        "usage": usage(prompt_tokens, 0),
    }


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chunk(
    kind: str, id_: str, created: int, model: str, delta: dict[str, Any] | str, finish: str | None
) -> dict[str, Any]:
    """A streamed chunk: `chat.completion.chunk` (delta dict) or `text_completion` (text)."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
        return {
            "id": id_,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    return {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}],
    }
