"""OpenAI's request bodies as pydantic models: what `/v1/completions`, `/v1/chat/completions`
and raylm's label routes accept, checked strictly (no type coercion, unknown fields refused) but
as OpenAI's own schema reads: `null` is the default, 3.0 is an integer, and fields raylm cannot
honour are refused by name."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from raylm.errors import raise_problems

# C0 controls other than tab/newline/carriage return, and DEL: refused in the label routes'
# texts (OpenAI's generation routes take any string).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_STOP = 4


def _clean_text(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains control characters")
    return value


def _refuse(field: str, value: Any, message: str) -> None:
    """A cross-field refusal that names its field (the error's `param`), not the whole body."""
    raise_problems("request", [((field,), value, message)])


def _valid_unicode(value: str, what: str) -> str:
    """Lone surrogates (`"\\ud800"` in JSON) are not text a tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate (invalid Unicode)") from None
    return value


def _whole(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer: accept it as 3 (a fraction stays refused)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Whole = Annotated[int, BeforeValidator(_whole)]
INT64 = 1 << 63
MAX_N = 128  # OpenAI's schema; the serve section's max_n is the working limit
MAX_LOGIT_BIAS = 300


class _Strict(BaseModel):
    # Strict: "0.5" is not a number and 1 is not a bool; unknown fields are refused, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable, and `null` means the default. An unknown
        field stays, null or not, so that it is refused."""
        if not isinstance(data, dict):
            return data
        known = {f.alias or name for name, f in cls.model_fields.items()}
        return {k: v for k, v in data.items() if v is not None or k not in known}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = False  # accepted; raylm pads nothing, so there is nothing to hide


class JsonSchemaFormat(_Strict):
    name: str = Field(max_length=64)  # a label for the client; decoding does not read it
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            _refuse("json_schema", None, "type 'json_schema' needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            _refuse(
                "json_schema", "…", f"json_schema goes with type 'json_schema', not {self.type!r}"
            )
        return self


# Fields OpenAI clients send that raylm cannot honour: refused by name, never ignored.
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "audio": "audio output",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "reasoning_effort": "reasoning models",
    "verbosity": "reasoning models",
}


SEED_BOUND = 9223372036854776000
GREEDY_BELOW = 1e-5


class _Request(_Strict):
    model: str | None = Field(None, min_length=1, max_length=256)
    # None: 16 for completions (OpenAI's default), the server's limit for chat.
    max_tokens: Whole | None = Field(None, ge=0, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)  # 0: greedy
    stop: str | list[str] | None = None
    # OpenAI's document bounds it at ±9223372036854776000 (int64 as a double); the replica
    # wraps it into int64.
    seed: Whole | None = Field(None, ge=-SEED_BOUND, le=SEED_BOUND)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Whole = Field(1, ge=1, le=MAX_N)
    user: str | None = None  # accepted, never logged
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Whole] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    # vLLM's sampling extensions, which benchmark and evaluation tools send.
    top_k: Whole = Field(0, ge=-1, le=1 << 20)  # 0 and -1: off
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    min_tokens: Whole = Field(0, ge=0, le=1 << 20)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None:
            if len(stops) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            for s in stops:
                _valid_unicode(s, "stop")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for key, bias in (v or {}).items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"key {key[:20]!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} for token {key} is outside -100..100")
        return v

    @model_validator(mode="after")
    def _limits(self) -> _Request:
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _refuse("min_tokens", self.min_tokens, f"is over max_tokens {self.max_tokens}")
        return self

    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple, without empty ones (they would stop nothing)."""
        return tuple(s for s in self.stop or () if s)

    def greedy(self) -> bool:
        """Temperature 0 or top_p 0: always the most likely token. So is a temperature too
        small to divide logits by without overflow (below 1e-5, as vLLM reads it)."""
        return self.temperature < GREEDY_BELOW or self.top_p == 0

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def _token_ids(value: list[Any]) -> list[int] | None:
    """`value` as token ids (whole floats included), or None if it is not a list of them."""
    ids = [_whole(v) for v in value]
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return ids
    return None


class CompletionRequest(_Request):
    # None: OpenAI's default, the start of a document. Checked by hand: one readable error
    # beats one per shape of the union.
    prompt: Any = None
    echo: bool = False
    logprobs: Whole | None = Field(None, ge=0, le=5)
    best_of: Whole | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[str] | list[int] | list[list[int]] | None:
        if v is None or isinstance(v, str):
            return _valid_unicode(v, "prompt") if v else v
        if not isinstance(v, list):
            raise ValueError(f"must be {PROMPT_SHAPES}")
        if not v:
            return []  # a list of no prompts: an answer of no choices
        if len(v) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} prompts per request")
        if all(isinstance(p, str) for p in v):
            return [_valid_unicode(p, "prompt") for p in v]
        ids = _token_ids(v)
        if ids is not None:
            return ids
        lists = [_token_ids(p) if isinstance(p, list) and p else None for p in v]
        if all(x is not None for x in lists):
            return lists  # type: ignore[return-value]
        raise ValueError(f"must be {PROMPT_SHAPES}")

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            _refuse("suffix", self.suffix, "suffix (inserting text) is not supported by raylm")
        if self.best_of is not None and self.best_of < self.n:
            _refuse("best_of", self.best_of, f"must be at least n ({self.n})")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            _refuse(
                "best_of", self.best_of, "above n cannot be streamed: the best are known at the end"
            )
        return self

    def candidates(self) -> int:
        """Answers generated per prompt: best_of, of which the n likeliest are returned."""
        return max(self.n, self.best_of or 0)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids. None is the start of a document ("")."""
        p = self.prompt
        if p is None:
            return [""]
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class Message(_Strict):
    role: Literal["developer", "system", "user", "assistant"]
    # Text, or a list of parts of which only text parts are supported; null for an assistant
    # turn that only carried a refusal or tool calls.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted; templates do not use it
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[dict[str, Any]] | None) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("needs at least one content part")
            for part in v:
                kind = part.get("type")
                if kind not in ("text", "refusal"):
                    raise ValueError(f"content part type {kind!r} is not supported; only 'text'")
                text = part.get(kind)
                if not isinstance(text, str) or set(part) != {"type", kind}:
                    raise ValueError(f"a {kind!r} part is {{'type': {kind!r}, {kind!r}: str}}")
                _valid_unicode(text, "content")
        elif isinstance(v, str):
            _valid_unicode(v, "content")
        return v

    @model_validator(mode="after")
    def _content_needed(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The message's text: the string, or its parts joined."""
        if isinstance(self.content, list):
            return "".join(p.get("text", p.get("refusal", "")) for p in self.content)
        return self.content if self.content is not None else (self.refusal or "")

    def turn(self) -> dict[str, str]:
        """The turn as chat templates take it: `developer` (OpenAI's newer name) as system."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=256)
    # Newer OpenAI clients send this name for chat; it means the same as max_tokens.
    max_completion_tokens: Whole | None = Field(None, ge=0, le=1 << 20)
    logprobs: bool = False
    top_logprobs: Whole | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Accepted and not needed to answer: storage, caching, routing and tracing hints.
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool = False
    service_tier: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        for name, what in UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and not (name == "tool_choice" and value == "none"):
                _refuse(name, value, f"{name} ({what}) is not supported by raylm")
        if self.modalities and "audio" in self.modalities:
            _refuse("modalities", self.modalities, "only 'text' output is supported")
        if self.top_logprobs is not None and not self.logprobs:
            _refuse("top_logprobs", self.top_logprobs, "needs logprobs: true, as OpenAI's does")
        # max_completion_tokens replaces the deprecated max_tokens: with both, it decides.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def turns(self) -> list[dict[str, str]]:
        """The conversation as role/content dicts for the prompt builder."""
        return [m.turn() for m in self.messages]


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
