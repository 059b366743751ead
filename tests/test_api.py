"""The OpenAI wire format and the inference Engine, without a server: strict request parsing,
error bodies, stop handling, and batched / streamed decoding equal to plain `generate`."""

from __future__ import annotations

import asyncio
import json

import pytest

from raylm.serving.engine import Engine, Sampling, cut_at_stop
from raylm.serving.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LabelRequest,
    chunk,
    parse_body,
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
        (b'{"prompt": ""}', JSON, 400, "prompt"),
        (b'{"prompt": 12}', JSON, 400, "prompt"),
        (b'{"prompt": "a\\u0000b"}', JSON, 400, "prompt"),
        (b'{"prompt": "hi", "max_tokens": "5"}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": 0}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "max_tokens": true}', JSON, 400, "max_tokens"),
        (b'{"prompt": "hi", "temperature": 2.5}', JSON, 400, "temperature"),
        (b'{"prompt": "hi", "top_p": 0}', JSON, 400, "top_p"),
        (b'{"prompt": "hi", "stop": ["a","b","c","d","e"]}', JSON, 400, "stop"),
        (b'{"prompt": "hi", "stop": [""]}', JSON, 400, "stop"),
        (b'{"prompt": "hi", "seed": -1}', JSON, 400, "seed"),
        (b'{"prompt": "hi", "n": 2}', JSON, 400, "n"),
        (b'{"prompt": "hi", "stream": "yes"}', JSON, 400, "stream"),
        (b'{"prompt": "hi", "logprobs": 3}', JSON, 400, "logprobs"),
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
        [{"role": "system", "content": "x"}],
        [{"role": "user", "content": "x", "extra": 1}],
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


def test_chat_accepts_max_completion_tokens_but_not_both_limits():
    msgs = [{"role": "user", "content": "hi"}]
    req = parse_body(
        json.dumps({"messages": msgs, "max_completion_tokens": 5}).encode(), JSON, ChatRequest
    )
    assert req.max_tokens == 5
    with pytest.raises(APIError) as info:
        parse_body(
            json.dumps({"messages": msgs, "max_tokens": 5, "max_completion_tokens": 5}).encode(),
            JSON,
            ChatRequest,
        )
    assert info.value.status == 400 and "not both" in info.value.message


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
    MAX_INPUTS,
    MAX_STOP,
    Message,
    chat_body,
    classify_body,
    completion_body,
    ner_body,
    new_id,
    sse,
    usage,
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
    three = _refusal({"prompt": "", "temperature": 3, "top_p": 0})
    assert three.param == "temperature"  # the first in field order
    assert three.message.startswith("temperature=3: ") and three.message.endswith(" (and 2 more)")
    two = _refusal({"prompt": "hi", "temperature": 3, "top_p": 0})
    assert two.message.endswith(" (and 1 more)")
    assert "more)" not in one.message


def test_a_long_bad_value_is_cut_to_60_characters():
    err = _refusal({"prompt": "\x00" + "b" * 200})
    value = err.message.removeprefix("prompt=").split(": ")[0]
    assert len(value) == 60 and value.endswith("...")


def test_a_whole_body_problem_has_no_param():
    msgs = [{"role": "user", "content": "hi"}]
    err = _refusal({"messages": msgs, "max_tokens": 5, "max_completion_tokens": 5}, ChatRequest)
    assert (err.status, err.code, err.param) == (400, "invalid_value", None)
    assert err.message.endswith("give max_tokens or max_completion_tokens, not both")


@pytest.mark.parametrize("char", ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1f", "\x7f"])
def test_control_characters_are_refused_in_every_text(char):
    err = _refusal({"prompt": f"a{char}b"})
    assert err.param == "prompt" and err.message.endswith(": prompt contains control characters")
    msgs = [{"role": "user", "content": f"a{char}b"}]
    err = _refusal({"messages": msgs}, ChatRequest)
    assert err.param == "messages.0.content"
    assert err.message.endswith(": content contains control characters")
    err = _refusal({"input": ["ok", f"a{char}b"]}, LabelRequest)
    assert err.param == "input" and err.message.endswith(": input contains control characters")


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
    empty = _refusal({"prompt": "hi", "stop": ["a", ""]})
    assert empty.param == "stop"
    assert empty.message.endswith(": stop sequences must be non-empty")
    assert _refusal({"prompt": "hi", "stop": ""}).param == "stop"


def test_chat_limit_names():
    msgs = [{"role": "user", "content": "hi"}]
    plain = parse_body(json.dumps({"messages": msgs, "max_tokens": 7}).encode(), JSON, ChatRequest)
    assert plain.max_tokens == 7 and plain.max_completion_tokens is None
    neither = parse_body(json.dumps({"messages": msgs}).encode(), JSON, ChatRequest)
    assert neither.max_tokens is None


@pytest.mark.parametrize(
    "messages, ok",
    [
        ([{"role": "user", "content": "hi"}], True),
        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], True),
        ([{"role": "user", "content": ""}, {"role": "user", "content": "hi"}], True),
        ([{"role": "user", "content": ""}], False),
        ([{"role": "assistant", "content": "hi"}], False),
        ([{"role": "system", "content": "hi"}, {"role": "assistant", "content": "x"}], False),
    ],
)
def test_chat_needs_a_non_empty_user_message(messages, ok):
    raw = json.dumps({"messages": messages}).encode()
    if ok:
        assert [m.role for m in parse_body(raw, JSON, ChatRequest).messages] == [
            m["role"] for m in messages
        ]
    else:
        err = _refusal(raw, ChatRequest)
        assert err.param == "messages"
        assert err.message.endswith(": needs at least one non-empty user message")


def test_message_fields():
    m = Message(role="user", content="hi", name="ann")
    assert (m.role, m.content, m.name) == ("user", "hi", "ann")
    msgs = [{"role": "user", "content": "hi", "name": "n" * 65}]
    assert _refusal({"messages": msgs}, ChatRequest).param == "messages.0.name"


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
    body = completion_body("m", "42", "length", 5, 2)
    _check_envelope(body, "cmpl", "text_completion", "m")
    assert body["choices"] == [
        {"index": 0, "text": "42", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == usage(5, 2)
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}


def test_chat_body():
    body = chat_body("m", "hello", "stop", 4, 1)
    _check_envelope(body, "chatcmpl", "chat.completion", "m")
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello"},
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
