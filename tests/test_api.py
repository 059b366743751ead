"""The OpenAI wire format and the inference Engine, without a server: strict request parsing,
error bodies, stop handling, and batched / streamed decoding equal to plain `generate`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from raylm.serving.engine import Engine, Sampling, cut_at_stop
from raylm.serving.openai_api import (
    APIError,
    chunk,
    parse_body,
)
from raylm.serving.openai_requests import (
    ChatRequest,
    CompletionRequest,
    LabelRequest,
)

JSON = "application/json"


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "param"),
    [
        (b'{"prompt": "hi"', JSON, 400, None),
        (b'{"prompt": "hi", "temperature": NaN}', JSON, 400, None),
        (b'{"prompt": "hi", "top_p": Infinity}', JSON, 400, None),
        (b'{"prompt": "hi", "temperature": 1e999}', JSON, 400, "temperature"),
        (b'\xff\xfe{"prompt": "hi"}', JSON, 400, None),
        (b'["prompt"]', JSON, 400, None),
        (b'{"prompt": "hi"}', "text/plain", 415, None),
        (b'{"prompt": "hi"}', None, 415, None),
        (b'{"prompt": 12}', JSON, 400, "prompt"),
        (b'{"prompt": [[]]}', JSON, 400, "prompt"),
        (b'{"prompt": [1, "a"]}', JSON, 400, "prompt"),
        (b'{"prompt": "a\\ud800b"}', JSON, 400, "prompt"),
        (b'{"prompt": "hi", "max_tokens": "5"}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": -1}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 1.5}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": true}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "temperature": 2.5}', JSON, 400, "temperature"),
        (b'{"prompt": "hi", "top_p": -0.1}', JSON, 400, "top_p"),
        (b'{"prompt": "hi", "stop": ["a","b","c","d","e"]}', JSON, 400, "stop"),
        (b'{"prompt": "hi", "seed": 9223372036854776001}', JSON, 400, "seed"),
        (b'{"prompt": "hi", "seed": "5"}', JSON, 400, "seed"),
        (b'{"prompt": "hi", "n": 0}', JSON, 400, "n"),
        (b'{"prompt": "hi", "n": 129}', JSON, 400, "n"),
        (b'{"prompt": "hi", "stream": "yes"}', JSON, 400, "stream"),
        (b'{"prompt": "hi", "logprobs": 6}', JSON, 400, "logprobs"),
        (b'{"prompt": "hi", "logprobs": true}', JSON, 400, "logprobs"),
        (b'{"prompt": "hi", "echo": 1}', JSON, 400, "echo"),
        (b'{"prompt": "hi", "suffix": "x"}', JSON, 400, "suffix"),
        (b'{"prompt": "hi", "best_of": 2, "n": 3}', JSON, 400, "best_of"),
        (b'{"prompt": "hi", "best_of": 3, "stream": true}', JSON, 400, "best_of"),
        (
            b'{"prompt": "hi", "stream_options": {"include_usage": 1}}',
            JSON,
            400,
            "stream_options.include_usage",
        ),
        (b'{"prompt": "hi", "stream_options": {"extra": true}}', JSON, 400, "stream_options.extra"),
        (b'{"prompt": "hi", "presence_penalty": 2.5}', JSON, 400, "presence_penalty"),
        (b'{"prompt": "hi", "frequency_penalty": -3}', JSON, 400, "frequency_penalty"),
        (b'{"prompt": "hi", "logit_bias": {"abc": 1}}', JSON, 400, "logit_bias"),
        (b'{"prompt": "hi", "logit_bias": {"5": 101}}', JSON, 400, "logit_bias"),
        (b'{"prompt": "hi", "logit_bias": {"5": 1.5}}', JSON, 400, "logit_bias.5"),
        (b'{"prompt": "hi", "logit_bias": [5]}', JSON, 400, "logit_bias"),
        (b'{"prompt": "hi", "top_k": -2}', JSON, 400, "top_k"),
        (b'{"prompt": "hi", "min_p": 1.5}', JSON, 400, "min_p"),
        (b'{"prompt": "hi", "repetition_penalty": 0}', JSON, 400, "repetition_penalty"),
        (b'{"prompt": "hi", "min_tokens": -1}', JSON, 400, "min_tokens"),
        (b'{"prompt": "hi", "min_tokens": 5, "max_tokens": 2}', JSON, 400, "min_tokens"),
        (b'{"prompt": "hi", "ignore_eos": "yes"}', JSON, 400, "ignore_eos"),
        (b'{"prompt": "hi", "skip_special_tokens": 0}', JSON, 400, "skip_special_tokens"),
    ],
)
def test_bad_completion_bodies_are_400s_naming_the_field(raw, ctype, status, param):
    with pytest.raises(APIError) as info:
        parse_body(raw, ctype, CompletionRequest)
    err = info.value
    assert err.status == status
    assert err.param == param
    body = err.body()["error"]
    assert body["type"] == "invalid_request_error" and body["message"]
    json.dumps(body)  # always serialisable, even for NaN/inf inputs


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "tool", "content": "x", "tool_call_id": "t"}],
        [{"role": "user", "content": "x", "extra": 1}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        [{"role": "user", "content": "x", "tool_calls": []}],
        "hello",
    ],
)
def test_bad_chat_messages_are_refused(messages):
    raw = json.dumps({"messages": messages}).encode()
    with pytest.raises(APIError) as info:
        parse_body(raw, JSON, ChatRequest)
    assert info.value.status == 400 and info.value.param.startswith("messages")


def test_good_request_parses_with_openai_defaults():
    req = parse_body(
        b'{"model": "m", "prompt": "1+1=", "stop": "\\n", "seed": 3}',
        "application/json; charset=utf-8",
        CompletionRequest,
    )
    # max_tokens None: the server picks OpenAI's default (16 for completions, room left for chat).
    assert (req.max_tokens, req.temperature, req.top_p, req.stops(), req.seed) == (
        None,
        1.0,
        1.0,
        ("\n",),
        3,
    )


def test_chat_max_completion_tokens_replaces_max_tokens():
    msgs = [{"role": "user", "content": "hi"}]
    req = parse_body(
        json.dumps({"messages": msgs, "max_completion_tokens": 5}).encode(), JSON, ChatRequest
    )
    assert req.max_tokens == 5
    both = {"messages": msgs, "max_tokens": 9, "max_completion_tokens": 3}
    assert parse_body(json.dumps(both).encode(), JSON, ChatRequest).max_tokens == 3


def test_stop_cut_and_chunk_shape():
    assert cut_at_stop("12\n34", ["\n"]) == ("12", True)
    assert cut_at_stop("1234", ["9", "34"]) == ("12", True)
    assert cut_at_stop("1234", []) == ("1234", False)
    c = chunk("chat", "id", 1, "m", {"content": "x"}, None)
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"}


@pytest.fixture(scope="module")
def engine():
    from raylm.models import materialize_tiny_llama

    return Engine([("tiny", str(materialize_tiny_llama()))])


def _reference(engine: Engine, ids: list[int], n: int) -> str:
    """Plain HF `generate` on one unpadded prompt: the baseline every path must match."""
    import torch

    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if engine.tokenizer.eos_token_id in new:
        new = new[: new.index(engine.tokenizer.eos_token_id)]
    return engine.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_equals_one_by_one_generate(engine):
    prompts = ["1", "12 13 14", "99-3=", "7 6 5 4 3 2"]
    ids = [engine.encode_prompt(p) for p in prompts]
    out = engine.generate([("tiny", i, Sampling(max_tokens=12)) for i in ids])
    assert [o.text for o in out] == [_reference(engine, i, 12) for i in ids]
    assert all(o.prompt_tokens == len(i) for o, i in zip(out, ids, strict=True))
    assert any(o.text for o in out)  # the pretrained base continues digit text


def test_stream_pieces_join_to_the_batched_answer_and_respect_stop(engine):
    ids = engine.encode_prompt("12 13 14")

    async def collect(sampling: Sampling) -> tuple[list[str], dict]:
        finish: dict = {}
        return [p async for p in engine.stream("tiny", ids, sampling, finish)], finish

    pieces, finish = asyncio.run(collect(Sampling(max_tokens=12)))
    whole = engine.generate([("tiny", ids, Sampling(max_tokens=12))])[0]
    assert "".join(pieces) == whole.text and finish["reason"] == whole.finish_reason
    stop = whole.text[3:5]
    assert stop, whole.text
    pieces, finish = asyncio.run(collect(Sampling(max_tokens=12, stop=(stop,))))
    assert "".join(pieces) == whole.text[: whole.text.find(stop)] and finish["reason"] == "stop"


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """An Engine over a model that never ends a text by itself: every answer runs to its limit."""
    from .conftest import endless_llama

    return Engine([("endless", endless_llama(tmp_path_factory.mktemp("endless")))])


def test_seeded_sampling_repeats_and_max_tokens_is_exact(endless):
    ids = endless.encode_prompt("5")
    s = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    a, b = endless.generate([("endless", ids, s), ("endless", ids, s)])
    assert a.text == b.text  # the seed decides the sample
    assert (a.completion_tokens, a.finish_reason) == (12, "length")
    other = endless.generate([("endless", ids, Sampling(12, 1.0, 0.9, seed=12))])[0]
    assert other.text != a.text  # ...and temperature is used: another seed, another answer
    for n in (1, 3, 7):
        greedy = endless.generate([("endless", ids, Sampling(max_tokens=n))])[0]
        assert (greedy.completion_tokens, greedy.finish_reason) == (n, "length")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{}", "input"),
        (b'{"input": ""}', "input"),
        (b'{"input": "   "}', "input"),
        (b'{"input": []}', "input"),
        (b'{"input": ["ok", ""]}', "input"),
        (b'{"input": ["ok", 3]}', "input.list[str].1"),
        (b'{"input": 7}', "input"),
        (b'{"input": {"text": "hi"}}', "input"),
        (b'{"input": "a\\u0007b"}', "input"),
        (b'{"input": "hi", "stream": true}', "stream"),
        (b'{"input": "hi", "model": ""}', "model"),
        (b'{"input": "hi", "top_k": 3}', "top_k"),
    ],
)
def test_bad_label_requests_name_their_field(raw, param):
    with pytest.raises(APIError) as info:
        parse_body(raw, JSON, LabelRequest)
    assert info.value.status == 400
    assert (info.value.param or "").startswith(param.split(".")[0]), info.value.message


def test_label_request_takes_one_text_or_a_list_of_them():
    assert parse_body(b'{"input": "good film"}', JSON, LabelRequest).texts() == ["good film"]
    req = parse_body(b'{"input": ["a", "b"], "model": "m"}', JSON, LabelRequest)
    assert req.texts() == ["a", "b"] and req.model == "m"
    with pytest.raises(APIError, match="at most 256 texts"):
        parse_body(json.dumps({"input": ["x"] * 257}).encode(), JSON, LabelRequest)


# -- the wire format alone: errors, request validators, response bodies -----------------------

import re  # noqa: E402
import time  # noqa: E402

from raylm.serving.openai_api import (  # noqa: E402
    chat_body,
    chat_choice,
    classify_body,
    completion_body,
    ner_body,
    new_id,
    sse,
    text_choice,
    usage,
    usage_chunk,
)
from raylm.serving.openai_requests import (  # noqa: E402
    MAX_INPUTS,
    MAX_STOP,
    UNSUPPORTED,
    Message,
)


def _refusal(body, model=CompletionRequest, ctype=JSON) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_body(raw, ctype, model)
    return info.value


@pytest.mark.parametrize(
    "status, kind",
    [
        (400, "invalid_request_error"),
        (499, "invalid_request_error"),
        (500, "server_error"),
        (503, "server_error"),
    ],
)
def test_api_error_type_follows_the_status(status, kind):
    err = APIError(status, "went wrong")
    assert (err.status, err.message, err.param, err.code, err.type) == (
        status,
        "went wrong",
        None,
        None,
        kind,
    )
    assert str(err) == "went wrong"


def test_api_error_body_is_openais_error_object():
    err = APIError(404, "no such model", param="model", code="model_not_found", type_="not_found")
    assert err.body() == {
        "error": {
            "message": "no such model",
            "type": "not_found",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize(
    "ctype", ["application/json", "Application/JSON", " application/json ; charset=utf-8"]
)
def test_json_content_types_are_accepted_whatever_case_and_parameters(ctype):
    assert parse_body(b'{"prompt": "hi"}', ctype, CompletionRequest).prompt == "hi"


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/jsonl", "json"])
def test_other_content_types_are_415(ctype):
    err = _refusal(b'{"prompt": "hi"}', ctype=ctype)
    assert (err.status, err.code, err.param) == (415, "unsupported_media_type", None)
    assert err.type == "invalid_request_error"
    assert err.message == f"Content-Type must be application/json, got {ctype!r}"


def test_bodies_that_are_not_json_objects_are_invalid_json():
    utf = _refusal(b'{"prompt": "\xff"}')
    assert (utf.status, utf.code, utf.param) == (400, "invalid_json", None)
    assert utf.message == "request body is not valid UTF-8"
    broken = _refusal(b'{"prompt": ')
    assert (broken.status, broken.code) == (400, "invalid_json")
    assert broken.message.startswith("request body is not valid JSON: ")
    deep = _refusal(b"[" * 100_000 + b"]" * 100_000)
    assert (deep.status, deep.code) == (400, "invalid_json")
    for raw in (b"[]", b'"prompt"', b"3", b"null"):
        err = _refusal(raw)
        assert (err.status, err.code, err.message) == (
            400,
            "invalid_json",
            "request body must be a JSON object",
        )


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_named(constant):
    err = _refusal(f'{{"prompt": "hi", "temperature": {constant}}}'.encode())
    assert (err.status, err.code) == (400, "invalid_json")
    assert err.message == f"request body is not valid JSON: {constant} is not valid JSON"


def test_a_validation_error_names_its_field_value_and_how_many_more():
    one = _refusal({"prompt": "hi", "temperature": 3})
    assert (one.status, one.code, one.param) == (400, "invalid_value", "temperature")
    assert one.message.startswith("temperature=3: ")
    three = _refusal({"prompt": 5, "temperature": 3, "top_p": -1})
    assert three.param == "temperature"  # the first in field order
    assert three.message.startswith("temperature=3: ") and three.message.endswith(
        " (and 2 more problems)"
    )
    two = _refusal({"prompt": "hi", "temperature": 3, "top_p": -1})
    assert two.message.endswith(" (and 1 more problem)")
    assert "more)" not in one.message


def test_a_long_bad_value_is_cut_to_60_characters():
    err = _refusal({"prompt": "\ud800" + "b" * 200})
    value = err.message.removeprefix("prompt=").split(": ")[0]
    assert len(value) == 60 and value.endswith("...")


def test_a_cross_field_problem_names_its_field_not_the_body():
    err = _refusal({"prompt": "x", "best_of": 1, "n": 2})
    assert (err.status, err.code, err.param) == (400, "invalid_value", "best_of")
    assert err.message == "best_of=1: must be at least n (2)"
    msgs = [{"role": "user", "content": "hi"}]
    err = _refusal({"messages": msgs, "top_logprobs": 2}, ChatRequest)
    assert err.param == "top_logprobs" and "needs logprobs: true" in err.message
    err = _refusal({"messages": msgs, "response_format": {"type": "json_schema"}}, ChatRequest)
    assert err.param == "response_format.json_schema"
    assert err.message.endswith("type 'json_schema' needs a json_schema object")


@pytest.mark.parametrize("char", ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1f", "\x7f"])
def test_control_characters_reach_the_model_but_not_the_label_routes(char):
    # OpenAI takes any string in a prompt or message; raylm's own label routes stay strict.
    assert parse_body(json.dumps({"prompt": f"a{char}b"}).encode(), JSON, CompletionRequest)
    msgs = [{"role": "user", "content": f"a{char}b"}]
    assert parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest)
    err = _refusal({"input": ["ok", f"a{char}b"]}, LabelRequest)
    assert err.param == "input" and err.message.endswith(": input contains control characters")


@pytest.mark.parametrize("field", ["prompt", "content", "stop"])
def test_lone_surrogates_are_refused_wherever_text_goes_to_the_tokenizer(field):
    bad = "a\ud800b"
    body = {
        "prompt": {"prompt": bad},
        "content": {"messages": [{"role": "user", "content": bad}]},
        "stop": {"prompt": "x", "stop": [bad]},
    }[field]
    err = _refusal(body, ChatRequest if field == "content" else CompletionRequest)
    assert err.status == 400 and "lone surrogate" in err.message


@pytest.mark.parametrize("char", ["\t", "\n", "\r", " ", "é", "\x80"])
def test_whitespace_and_printable_text_is_accepted(char):
    assert parse_body(json.dumps({"prompt": f"a{char}b"}).encode(), JSON, CompletionRequest)
    msgs = [{"role": "user", "content": f"a{char}b"}]
    assert parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest)
    assert parse_body(json.dumps({"input": f"a{char}b"}).encode(), JSON, LabelRequest)


def test_stop_takes_one_string_or_up_to_four():
    def stops(stop):
        return parse_body(
            json.dumps({"prompt": "hi", "stop": stop}).encode(), JSON, CompletionRequest
        )

    assert stops("\n").stop == ["\n"] and stops("\n").stops() == ("\n",)
    assert stops(["a", "b", "c", "d"]).stops() == ("a", "b", "c", "d")
    assert MAX_STOP == 4
    assert stops(None).stop is None and stops(None).stops() == ()
    assert stops([]).stops() == ()
    too_many = _refusal({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]})
    assert too_many.param == "stop" and too_many.message.endswith(": at most 4 stop sequences")
    # An empty stop string would stop nothing: OpenAI accepts and ignores it.
    assert stops(["a", ""]).stops() == ("a",) and stops("").stops() == ()


def test_chat_limit_names():
    msgs = [{"role": "user", "content": "hi"}]
    plain = parse_body(json.dumps({"messages": msgs, "max_tokens": 7}).encode(), JSON, ChatRequest)
    assert plain.max_tokens == 7 and plain.max_completion_tokens is None
    neither = parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest)
    assert neither.max_tokens is None


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "hi"}],
        [{"role": "developer", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}],
        [{"role": "assistant", "content": None, "refusal": "no"}],
    ],
)
def test_any_conversation_of_text_turns_is_accepted(messages):
    # OpenAI answers a system prompt alone, an assistant prefill or an empty user turn.
    raw = json.dumps({"messages": messages}).encode()
    turns = parse_body(raw, JSON, ChatRequest).turns()
    assert [t["role"] for t in turns] == [
        "system" if m["role"] == "developer" else m["role"] for m in messages
    ]


def test_content_parts_are_joined_text_and_developer_is_system():
    msgs = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "refusal": "I can't"},
    ]
    req = parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest)
    assert req.turns() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "I can't"},
    ]
    err = _refusal(
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        ChatRequest,
    )
    assert err.param == "messages.0.content"
    assert err.message.endswith("content part type 'input_audio' is not supported; only 'text'")


def test_message_fields():
    m = Message(role="user", content="hi", name="ann")
    assert (m.role, m.content, m.name) == ("user", "hi", "ann")
    # `name` is accepted whatever its length (OpenAI's schema sets none) and not templated.
    msgs = [{"role": "user", "content": "hi", "name": "n" * 65}]
    assert parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest).turns() == [
        {"role": "user", "content": "hi"}
    ]


def test_label_input_limits():
    assert MAX_INPUTS == 256
    ok = parse_body(json.dumps({"input": ["x"] * 256}).encode(), JSON, LabelRequest)
    assert len(ok.texts()) == 256
    too_many = _refusal({"input": ["x"] * 257}, LabelRequest)
    assert too_many.param == "input"
    assert too_many.message.endswith(": at most 256 texts per request")
    none = _refusal({"input": []}, LabelRequest)
    assert none.param == "input" and none.message.endswith(": needs at least one text")
    blank = _refusal({"input": ["ok", " \n"]}, LabelRequest)
    assert blank.param == "input" and blank.message.endswith(": texts must not be empty")
    req = parse_body(b'{"input": ["a", "b"]}', JSON, LabelRequest)
    texts = req.texts()
    texts.append("c")
    assert req.texts() == ["a", "b"]  # a copy, not the request's own list


def test_ids_are_prefixed_and_unique():
    ids = {new_id("cmpl") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{24}", i) for i in ids)


def test_usage_totals():
    assert usage(7, 3) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _check_envelope(body, prefix, obj, model):
    assert re.fullmatch(rf"{prefix}-[0-9a-f]{{24}}", body["id"]), body["id"]
    assert body["object"] == obj and body["model"] == model
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 5


def test_completion_body():
    body = completion_body("m", [text_choice(0, "42", "length")], 5, 2)
    _check_envelope(body, "cmpl", "text_completion", "m")
    assert body["choices"] == [
        {"index": 0, "text": "42", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == usage(5, 2)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}


def test_chat_body():
    body = chat_body("m", [chat_choice(0, "hello", "stop")], 4, 1)
    _check_envelope(body, "chatcmpl", "chat.completion", "m")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == usage(4, 1)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}


def test_classify_body_numbers_each_text_in_order():
    labels = [{"label": "pos", "score": 0.9}, {"label": "neg", "score": 0.6}]
    body = classify_body("c", labels, 11)
    _check_envelope(body, "clf", "classification", "c")
    assert body["data"] == [
        {"index": 0, "label": "pos", "score": 0.9},
        {"index": 1, "label": "neg", "score": 0.6},
    ]
    assert body["usage"] == usage(11, 0)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}


def test_ner_body_numbers_each_text_in_order():
    ents = [[{"entity": "PER", "text": "Ann", "start": 0, "end": 3, "score": 0.9}], []]
    body = ner_body("t", ents, 6)
    _check_envelope(body, "ner", "ner", "t")
    assert body["data"] == [{"index": 0, "entities": ents[0]}, {"index": 1, "entities": []}]
    assert body["usage"] == usage(6, 0)
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}


def test_sse_events():
    assert sse("[DONE]") == "data: [DONE]\n\n"
    assert sse({"a": [1, "x"]}) == 'data: {"a": [1, "x"]}\n\n'


def test_stream_chunks():
    assert chunk("chat", "id1", 5, "m", {"role": "assistant"}, None) == {
        "id": "id1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert chunk("text", "id2", 6, "m", "4", "stop") == {
        "id": "id2",
        "object": "text_completion",
        "created": 6,
        "model": "m",
        "choices": [{"index": 0, "text": "4", "logprobs": None, "finish_reason": "stop"}],
    }


# -- what OpenAI's schema calls valid (issue 21) and the fields real clients add (issue 16) -------


def _ok(body: dict, model: type = CompletionRequest):
    return parse_body(json.dumps(body).encode(), JSON, model)


def test_null_means_the_default_for_every_optional_field():
    nulls = {
        k: None
        for k in (
            "stream",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream_options",
            "max_tokens",
            "logit_bias",
            "presence_penalty",
            "user",
            "model",
        )
    }
    comp = _ok({"prompt": None, "logprobs": None, "echo": None, **nulls})
    chat = _ok(
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": None, **nulls}, ChatRequest
    )
    for req in (comp, chat):
        assert (req.stream, req.temperature, req.top_p, req.n, req.stops(), req.seed) == (
            False,
            1.0,
            1.0,
            1,
            (),
            None,
        )
        assert (req.max_tokens, req.logit_bias, req.include_usage()) == (None, None, False)
    assert comp.prompts() == [""] and comp.logprobs is None and chat.logprobs is False
    assert (
        _refusal({"messages": None}, ChatRequest).message == "messages: required field is missing"
    )
    # null is the default of a field raylm knows; an unknown field is refused, null or not
    assert _refusal({"prompt": "x", "sufix": None}).param == "sufix"
    assert _refusal({"prompt": "x", "stream_options": {"usage": None}}).param == (
        "stream_options.usage"
    )


@pytest.mark.parametrize("field", ["max_tokens", "seed", "n", "top_k", "min_tokens"])
def test_whole_floats_are_integers_and_fractions_are_not(field):
    assert getattr(_ok({"prompt": "x", field: 3.0}), field) == 3
    assert isinstance(getattr(_ok({"prompt": "x", field: 3.0}), field), int)
    assert _refusal({"prompt": "x", field: 3.5}).param == field
    assert _refusal({"prompt": "x", field: "3"}).param == field
    assert _refusal({"prompt": "x", field: True}).param == field


def test_edge_values_openai_accepts():
    assert _ok({"prompt": "x", "top_p": 0}).greedy()
    assert _ok({"prompt": "x", "temperature": 0}).greedy()
    assert not _ok({"prompt": "x", "temperature": 0.7}).greedy()
    assert _ok({"prompt": "x", "temperature": 2.2e-311}).greedy()  # logits / t would overflow
    assert not _ok({"prompt": "x", "temperature": 1e-5}).greedy()
    assert _ok({"prompt": "x", "seed": -(1 << 63)}).seed == -(1 << 63)
    assert _ok({"prompt": "x", "seed": (1 << 63) - 1}).seed == (1 << 63) - 1
    # OpenAI's document bounds seeds at int64 written as a double: 9223372036854776000
    assert _ok({"prompt": "x", "seed": 9223372036854776000}).seed == 9223372036854776000
    assert _ok({"prompt": "x", "max_tokens": 0}).max_tokens == 0
    assert _ok({}).prompts() == [""] and _ok({"prompt": ""}).prompts() == [""]
    opts = _ok(
        {"prompt": "x", "stream_options": {"include_usage": True, "include_obfuscation": True}}
    )
    assert opts.include_usage()
    assert _ok({"prompt": "x", "user": "u" * 1000}).user == "u" * 1000


@pytest.mark.parametrize(
    "prompt, prompts",
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([5, 6.0], [[5, 6]]),
        ([[5], [6, 7]], [[5], [6, 7]]),
        ([], []),  # no prompts: no choices
    ],
)
def test_prompt_takes_each_of_openais_four_shapes(prompt, prompts):
    assert _ok({"prompt": prompt}).prompts() == prompts


def test_a_bad_prompt_names_the_shapes_it_can_take():
    for bad in (5, [[]], [1, "a"], [["a"]], {"a": 1}, [True]):
        err = _refusal({"prompt": bad})
        assert err.param == "prompt", bad
        if bad not in ([],):
            assert "a list of token-id lists" in err.message, (bad, err.message)
    assert "at most 256 prompts" in _refusal({"prompt": ["x"] * 257}).message


def test_logit_bias_keys_are_token_ids_and_values_within_100():
    assert _ok({"prompt": "x", "logit_bias": {"5": -100, "7": 100.0}}).logit_bias == {
        "5": -100,
        "7": 100,
    }
    assert _ok({"prompt": "x", "logit_bias": {}}).logit_bias == {}
    assert "is not a token id" in _refusal({"prompt": "x", "logit_bias": {"-1": 1}}).message
    assert "outside -100..100" in _refusal({"prompt": "x", "logit_bias": {"1": -101}}).message


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "low"),
        ("verbosity", "low"),
    ],
)
def test_fields_raylm_cannot_honour_are_refused_by_name(field, value):
    msgs = [{"role": "user", "content": "hi"}]
    err = _refusal({"messages": msgs, field: value}, ChatRequest)
    assert err.status == 400 and err.message.endswith(
        f"{field} ({UNSUPPORTED[field]}) is not supported by raylm"
    )
    assert err.param == field  # what a client can branch on


def test_hints_that_do_not_change_the_answer_are_accepted():
    msgs = [{"role": "user", "content": "hi"}]
    req = _ok(
        {
            "messages": msgs,
            "metadata": {"k": "v"},
            "store": False,
            "service_tier": "auto",
            "safety_identifier": "s",
            "prompt_cache_key": "k",
            "parallel_tool_calls": True,
            "tool_choice": "none",
            "modalities": ["text"],
            "response_format": {"type": "text"},
        },
        ChatRequest,
    )
    assert req.response_format.type == "text"
    assert (
        "only 'text'" in _refusal({"messages": msgs, "modalities": ["audio"]}, ChatRequest).message
    )


def test_response_format_json_schema_comes_with_its_schema():
    msgs = [{"role": "user", "content": "hi"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    req = _ok({"messages": msgs, "response_format": fmt}, ChatRequest)
    assert req.response_format.json_schema.schema_ == {"type": "object"}
    for bad in ({"type": "json_schema"}, {"type": "json_object", "json_schema": {"name": "x"}}):
        assert _refusal({"messages": msgs, "response_format": bad}, ChatRequest).status == 400
    assert _refusal({"messages": msgs, "response_format": {"type": "xml"}}, ChatRequest).param == (
        "response_format.type"
    )


def test_bodies_carry_every_choice_and_a_usage_chunk_has_none():
    body = chat_body("m", [chat_choice(i, t, "stop") for i, t in enumerate("ab")], 3, 2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    last = usage_chunk("chat", "id", 5, "m", 3, 2)
    assert last["choices"] == [] and last["usage"] == usage(3, 2)
    assert last["object"] == "chat.completion.chunk"
    assert usage_chunk("text", "id", 5, "m", 3, 2)["object"] == "text_completion"
    assert chunk("text", "i", 1, "m", "x", None, index=3)["choices"][0]["index"] == 3


# -- the sampling extensions, on the engine ----------------------------------------------------


def test_penalties_lower_each_logit_by_count_and_presence_of_generated_tokens_only():
    import torch

    from raylm.serving.engine import _Penalties

    ids = torch.tensor([[4, 4, 1, 1, 2], [0, 3, 3, 3, 3]])  # prompt width 2: counted from col 2
    scores = torch.zeros(2, 5)
    out = _Penalties(2, presence=0.5, frequency=0.25)(ids, scores)
    # row 0 generated [1, 1, 2]: token 1 twice, token 2 once; token 4 is only in the prompt
    assert out[0].tolist() == [0.0, -1.0, -0.75, 0.0, 0.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, -1.25, 0.0]
    assert _Penalties(5, 1.0, 1.0)(ids, scores).tolist() == scores.tolist()  # nothing generated


def test_logit_bias_eos_ignore_eos_min_tokens_and_special_tokens(engine):
    from dataclasses import replace

    eos = engine.tokenizer.eos_token_id
    ids = engine.encode_prompt("12+7=")
    g = Sampling(max_tokens=6)

    def one(**kw):
        return engine.generate([("tiny", ids, replace(g, **kw))])[0]

    forced = ((eos, 100.0),)
    assert (one(logit_bias=forced).completion_tokens, one(logit_bias=forced).finish_reason) == (
        0,
        "stop",
    )
    through = one(logit_bias=forced, ignore_eos=True)
    assert (through.text, through.completion_tokens, through.finish_reason) == ("", 6, "length")
    shown = one(logit_bias=forced, ignore_eos=True, skip_special_tokens=False)
    assert shown.text == engine.tokenizer.eos_token * 6
    assert one(logit_bias=forced, min_tokens=3).completion_tokens == 3
    seven = engine.tokenizer.convert_tokens_to_ids("7")
    only7 = one(logit_bias=((seven, 100.0), (eos, -100.0)))
    assert only7.text == "7" * 6


def test_top_k_1_and_min_p_1_sample_the_greedy_answer(endless):
    ids = endless.encode_prompt("5")

    def text(s: Sampling) -> str:
        return endless.generate([("endless", ids, s)])[0].text

    greedy = text(Sampling(max_tokens=8))
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in (1, 2):
            assert text(Sampling(max_tokens=8, temperature=1.5, seed=seed, **kw)) == greedy, kw
    wild = {text(Sampling(8, 1.5, seed=s)) for s in range(4)}
    assert wild != {greedy}  # without them, sampling at 1.5 strays


def test_frequency_and_repetition_penalties_stop_greedy_repeating(endless):
    ids = endless.encode_prompt("5")

    def most_repeated(**kw) -> tuple[int, list[int]]:
        """How often the answer's commonest token appears (what both penalties push down)."""
        tokens = endless.generate([("endless", ids, Sampling(max_tokens=12, **kw))])[0].token_ids
        return max(tokens.count(t) for t in tokens), tokens

    plain = most_repeated()
    assert plain[0] >= 4, plain  # greedy on this model counts "5 56 57 58 ...": '5' every third
    for kw in ({"frequency_penalty": 2.0}, {"repetition_penalty": 3.0}):
        assert most_repeated(**kw)[0] < plain[0], (kw, plain, most_repeated(**kw))


def test_an_empty_prompt_is_the_start_of_a_document(engine):
    assert engine.encode_prompt("") == [engine.tokenizer.bos_token_id]
    assert engine.vocab_size == len(engine.tokenizer)


def test_a_stop_string_no_token_spells_is_still_a_stop(engine):
    """transformers refuses to watch for a stop string with characters outside the vocabulary;
    such a string cannot stop generation early, and must not fail the request either."""
    ids = engine.encode_prompt("1+1=")
    sevens = ((engine.tokenizer.convert_tokens_to_ids("7"), 100.0),)
    only_odd = Sampling(max_tokens=6, ignore_eos=True, logit_bias=sevens, stop=("☃",))
    assert engine._early_stops(only_odd.stop) == []
    out = engine.generate([("tiny", ids, only_odd)])[0]
    assert (out.text, out.finish_reason) == ("777777", "length")
    mixed = replace(only_odd, stop=("☃\u0007", "77"))
    assert engine._early_stops(mixed.stop) == ["77"]
    out = engine.generate([("tiny", ids, mixed)])[0]
    assert (out.text, out.finish_reason) == ("", "stop")


def test_every_field_the_conformance_test_drops_is_in_the_readme_as_not_supported():
    from pathlib import Path

    from raylm.serving.openai_requests import UNSUPPORTED

    from .openai_subset import PLATFORM_ONLY

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    refused = [
        row for row in readme.splitlines() if row.startswith("| `") and "**not supported**" in row
    ]
    dropped = {f for fields in PLATFORM_ONLY.values() for f in fields} | set(UNSUPPORTED)
    for field in sorted(dropped):
        assert any(f"`{field}`" in row for row in refused), field


def test_the_text_subset_keeps_three_operations_and_refuses_unknown_fields():
    from .openai_subset import PLATFORM_ONLY, cap, load_official, text_subset

    doc = text_subset(load_official(), "m", 100)
    assert {(p, m) for p, ops in doc["paths"].items() for m in ops} == {
        ("/models", "get"),
        ("/completions", "post"),
        ("/chat/completions", "post"),
    }
    s = doc["components"]["schemas"]
    for name, kind in (
        ("CreateCompletionRequest", "completions"),
        ("CreateChatCompletionRequest", "chat"),
    ):
        assert s[name]["additionalProperties"] is False
        assert not set(PLATFORM_ONLY[kind]) & set(s[name]["properties"])
        assert s[name]["properties"]["model"] == {"type": "string", "enum": ["m"]}
    assert s["ChatCompletionStreamOptions"]["anyOf"][0]["additionalProperties"] is False
    capped = cap({"n": 100.0, "best_of": 0, "max_tokens": 5000, "prompt": ["a" * 100] * 5})
    assert capped == {"n": 2, "best_of": 2, "max_tokens": 6, "prompt": ["a" * 40] * 3}


def test_raylms_client_refuses_stream_before_sending_and_points_to_openai():
    from raylm.client import Client

    c = Client("http://127.0.0.1:9")  # nothing listens there: a send would be a URLError
    for call in (lambda: c.completion("1+1=", stream=True), lambda: c.chat([], stream=True)):
        with pytest.raises(ValueError, match="use the openai package"):
            call()
