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


def test_seeded_sampling_repeats_and_max_tokens_bounds_length(engine):
    ids = engine.encode_prompt("5")
    s = Sampling(max_tokens=6, temperature=1.0, top_p=0.9, seed=11)
    a, b = engine.generate([("tiny", ids, s), ("tiny", ids, s)])
    assert a.text == b.text
    assert a.completion_tokens <= 6
    greedy = engine.generate([("tiny", ids, Sampling(max_tokens=3))])[0]
    assert greedy.completion_tokens <= 3 and greedy.finish_reason in ("stop", "length")


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
