"""Logprobs, echo scoring and JSON output on the Engine, against the in-process model: token
log-probabilities equal log-softmax of the model's own logits, echo scores the prompt as a plain
forward pass does, and constrained decoding only ever produces JSON that fits its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from raylm.serving.engine import Engine, Sampling
from raylm.serving.guided import ANY_OBJECT, schema_problem
from raylm.serving.logprobs import TokenLogprob, chat_shape, completion_shape, token_pieces


@pytest.fixture(scope="module")
def engine():
    from raylm.models import materialize_tiny_llama

    return Engine([("tiny", str(materialize_tiny_llama()))])


def _log_softmax_rows(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The in-process model's log-softmax at every position of `ids`."""
    with torch.inference_mode():
        return engine.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_generated_token_logprobs_are_the_models_log_softmax(engine):
    ids = engine.encode_prompt("12+7=")
    s = Sampling(max_tokens=5, logprobs=3, ignore_eos=True)
    out = engine.generate([("tiny", ids, s)])[0]
    assert len(out.token_ids) == len(out.logprobs) == 5
    ref = _log_softmax_rows(engine, ids + out.token_ids)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(ids) - 1 + i]
        assert lp.id == token
        assert lp.logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, top = row.topk(3)
        assert [t for t, _ in lp.top] == top.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
    # greedy: the chosen token is the most likely one
    assert all(lp.top[0][0] == lp.id for lp in out.logprobs)


def test_batched_rows_get_their_own_logprobs(engine):
    prompts = [engine.encode_prompt(p) for p in ("1+1=", "123+456=", "9=")]
    s = Sampling(max_tokens=4, logprobs=0, ignore_eos=True)
    together = engine.generate([("tiny", ids, s) for ids in prompts])
    alone = [engine.generate([("tiny", ids, s)])[0] for ids in prompts]
    for a, b in zip(together, alone, strict=True):
        assert a.token_ids == b.token_ids
        assert [x.logprob for x in a.logprobs] == pytest.approx(
            [x.logprob for x in b.logprobs], abs=1e-4
        )
        assert all(x.top == () for x in a.logprobs)  # k = 0: the chosen token only


def test_echo_with_max_tokens_0_scores_the_prompt_as_a_forward_pass_does(engine):
    ids = engine.encode_prompt("12+7=19")
    out = engine.generate([("tiny", ids, Sampling(max_tokens=0, logprobs=1, echo=True))])[0]
    assert (out.text, out.completion_tokens, out.token_ids) == ("", 0, [])
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    ref = _log_softmax_rows(engine, ids)
    for i in range(1, len(ids)):
        assert out.prompt_logprobs[i].id == ids[i]
        assert out.prompt_logprobs[i].logprob == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)


def test_tokens_cut_by_a_stop_string_leave_the_logprobs_too(engine):
    ids = engine.encode_prompt("12+7=")
    no_eos = ((engine.tokenizer.eos_token_id, -100.0),)
    free = engine.generate([("tiny", ids, Sampling(max_tokens=8, logprobs=0, logit_bias=no_eos))])[
        0
    ]
    stop = free.text[3]
    cut = engine.generate(
        [("tiny", ids, Sampling(max_tokens=8, logprobs=0, logit_bias=no_eos, stop=(stop,)))]
    )[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    assert engine.tokenizer.decode(cut.token_ids) == cut.text
    assert len(cut.logprobs) == len(cut.token_ids) < len(free.token_ids)


def test_chat_shape_is_openais():
    items = [TokenLogprob(5, -0.5, ((5, -0.5), (6, -1.5))), TokenLogprob(7, -0.1, ())]
    shape = chat_shape(items, {5: "a", 6: "é", 7: "c"}.__getitem__)
    assert shape["refusal"] is None
    assert shape["content"][0] == {
        "token": "a",
        "logprob": -0.5,
        "bytes": [97],
        "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "é", "logprob": -1.5, "bytes": [195, 169]},
        ],
    }
    assert shape["content"][1]["top_logprobs"] == []


def test_completion_shape_has_parallel_lists_and_a_null_first_echo_token():
    items = [None, TokenLogprob(6, -1.0, ((8, -0.2),)), TokenLogprob(7, -0.3, ())]
    names = {5: "ab", 6: "c", 7: "de", 8: "x"}.__getitem__
    shape = completion_shape(items, names, ["ab", "c", "de"], [0, 2, 3])
    assert shape == {
        "tokens": ["ab", "c", "de"],
        "token_logprobs": [None, -1.0, -0.3],
        # the chosen token is always among the top ones, as OpenAI answers
        "top_logprobs": [None, {"x": -0.2, "c": -1.0}, {"de": -0.3}],
        "text_offset": [0, 2, 3],
    }


def test_token_pieces_join_to_the_text_and_name_the_tokens_it_leaves_out():
    # A SentencePiece-like tokenizer: a word-initial token decodes with its space only after
    # other text, and the start-of-text token is left out of the text.
    vocab = {1: "<s>", 2: "▁Hello", 3: "▁world", 4: "!"}

    def decode(ids):
        text = "".join(vocab[t] for t in ids if t != 1).replace("▁", " ")
        return text.removeprefix(" ")

    pieces, offsets = token_pieces(decode, vocab.__getitem__, [1, 2, 3, 4])
    assert pieces == ["<s>", "Hello", " world", "!"]
    assert offsets == [0, 0, 5, 11]
    text = decode([1, 2, 3, 4])
    assert all(text[o : o + len(p)] == p for p, o in zip(pieces[1:], offsets[1:], strict=True))


SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer"},
        "sure": {"type": "boolean"},
        "unit": {"enum": ["m", "s"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["answer", "sure", "unit"],
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_always_parses_and_validates(engine, temperature):
    schema = json.dumps(SCHEMA, sort_keys=True)
    prompts = [engine.encode_prompt(f"{i}+{i * 3}=") for i in range(10)]
    outs = [
        engine.generate(
            [
                (
                    "tiny",
                    ids,
                    Sampling(max_tokens=160, temperature=temperature, seed=i, json_schema=schema),
                )
            ]
        )[0]
        for i, ids in enumerate(prompts)
    ]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    plain = engine.generate([("tiny", prompts[0], Sampling(max_tokens=20))])[0]
    # unconstrained, the toy writes arithmetic, not an object that fits
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(plain.text), SCHEMA)


def test_json_object_mode_gives_an_object(engine):
    out = engine.generate(
        [("tiny", engine.encode_prompt("1="), Sampling(max_tokens=60, json_schema=ANY_OBJECT))]
    )[0]
    assert out.text.lstrip().startswith("{")


def test_schemas_that_cannot_guide_decoding_are_named():
    assert schema_problem(SCHEMA) is None
    assert schema_problem({"type": "objekt"}).startswith("is not a valid JSON Schema: ")
    assert schema_problem({"type": "object", "required": "answer"}).startswith(
        "is not a valid JSON Schema"
    )
    # Bounds the enforcer would not hold the output to are refused, not silently broken.
    bounded = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}}
    assert schema_problem(bounded) == (
        "uses 'properties.a.maximum', which constrained decoding does not enforce"
    )
    nested = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"not": {}}]}}
    assert "'items.anyOf.1.not'" in schema_problem(nested)
    assert "'oneOf'" in schema_problem({"oneOf": [{"type": "string"}]})
    # format is meant (a date, a uuid) and not enforced; booleans and null in an enum or a const
    # would be written as Python spells them
    assert "'properties.d.format'" in schema_problem(
        {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}}
    )
    assert "'const'" in schema_problem({"const": True})
    assert "'items.enum'" in schema_problem({"type": "array", "items": {"enum": ["a", None]}})
    assert "cannot be compiled" in schema_problem({"enum": [7, "a"]})


@pytest.mark.parametrize(
    "schema, expected",
    [
        ({"type": "object", "properties": {"n": {"type": "integer", "const": 7}}}, {"n": 7}),
        ({"const": 7}, 7),
        ({"const": "seven"}, "seven"),
    ],
)
def test_a_const_is_written_as_its_value(engine, schema, expected):
    if "properties" in schema:
        schema = {**schema, "required": ["n"]}
    s = Sampling(max_tokens=40, json_schema=json.dumps(schema, sort_keys=True))
    out = engine.generate([("tiny", engine.encode_prompt("1+1="), s)])[0]
    assert out.finish_reason == "stop" and json.loads(out.text) == expected


def test_a_pydantic_style_schema_with_refs_and_optionals_is_enforced(engine):
    schema = {
        "$defs": {
            "City": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}},
                "required": ["name"],
            }
        },
        "type": "object",
        "title": "Trip",
        "properties": {
            "to": {"$ref": "#/$defs/City"},
            "days": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "kind": {"const": "trip"},
        },
        "required": ["to", "days", "kind"],
    }
    assert schema_problem(schema) is None
    for seed in range(5):
        out = engine.generate(
            [
                (
                    "tiny",
                    engine.encode_prompt(f"{seed}="),
                    Sampling(
                        max_tokens=120, temperature=1.0, seed=seed, json_schema=json.dumps(schema)
                    ),
                )
            ]
        )[0]
        jsonschema.validate(json.loads(out.text), schema)


def test_best_of_keeps_each_prompts_likeliest_candidates_per_token():
    from raylm.serving.engine import Completion
    from raylm.serving.openai_requests import CompletionRequest
    from raylm.serving.replica import _best

    def cand(text: str, *lps: float) -> Completion:
        items = [TokenLogprob(i, lp) for i, lp in enumerate(lps)]
        return Completion(text, 1, len(lps), "stop", list(range(len(lps))), items)

    req = CompletionRequest.model_validate({"prompt": ["a", "b"], "n": 2, "best_of": 3})
    assert req.candidates() == 3
    outs = [
        cand("a0", -1.0, -1.0),  # mean -1.0
        cand("a1", -0.1, -3.0, -0.2),  # mean -1.1: more likely in total than a0, not per token
        cand("a2", -0.5),
        cand("b0", -2.0),
        cand("b1", -0.01),
        cand("b2", -0.3, -0.3),
    ]
    plan = [("ids", i) for i in range(6)]
    kept_plan, kept = _best(req, plan, outs)
    assert [o.text for o in kept] == ["a2", "a0", "b1", "b2"]  # likeliest first, per prompt
    assert kept_plan == [plan[2], plan[0], plan[4], plan[5]]
    plain = CompletionRequest.model_validate({"prompt": "a", "n": 2})
    assert _best(plain, plan[:2], outs[:2]) == (plan[:2], outs[:2])


def test_seeds_beyond_int64_wrap_into_it():
    from raylm.serving.replica import _wrap_int64

    assert _wrap_int64((1 << 63) - 1) == (1 << 63) - 1
    assert _wrap_int64(1 << 63) == -(1 << 63)
    assert _wrap_int64(9223372036854776000) == 9223372036854776000 - (1 << 64)
    assert _wrap_int64(-9223372036854776000) == -9223372036854776000 + (1 << 64)
