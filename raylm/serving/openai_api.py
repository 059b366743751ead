"""The OpenAI-compatible wire format: strict JSON parsing into the request models
(`openai_requests`), OpenAI-style errors and response/chunk bodies. Pure Python (pydantic only), so
it is unit-testable without a server."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from raylm.errors import format_error


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
        extra = len(errors) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
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


def text_choice(
    index: int, text: str, finish: str, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One `/v1/completions` choice."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(
    index: int, text: str, finish: str, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One chat choice; OpenAI's schema requires `refusal` on the message (raylm never refuses
    in-band, so it is null)."""
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": logprobs,
        "finish_reason": finish,
    }


def completion_body(
    model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `text_completion` response."""
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_body(
    model: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A `chat.completion` response."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
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
    kind: str,
    id_: str,
    created: int,
    model: str,
    delta: dict[str, Any] | str,
    finish: str | None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A streamed chunk: `chat.completion.chunk` (delta dict) or `text_completion` (text)."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
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
        "choices": [text_choice(index, delta, finish, logprobs)],  # type: ignore[arg-type]
    }


def usage_chunk(
    kind: str, id_: str, created: int, model: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk of a stream asked for `stream_options.include_usage`: no choices, the
    whole request's usage."""
    return {
        "id": id_,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
