"""A real Serve app over real HTTP on 127.0.0.1: a 2-trial sweep trains two LoRA adapters with
different answers, `raylm serve JOB` serves the winner and both trials side by side, and the
official `openai` client, raw bad requests and an API key exercise the OpenAI-compatible API."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from raylm.job import load_job

from .conftest import metric_total, prometheus_text, tiny_job, wait_for_metric

pytestmark = pytest.mark.ray

KEY_ENV = "RAYLM_TEST_API_KEY"
KEY = "test-key-0123456789"
ANSWERS = {"a": "42", "b": "7"}  # each adapter learns to answer everything with its constant


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """Sweep over two datasets → promoted winner + top-2 adapters served with an API key."""
    from raylm.serving.deploy import resolve_target, shutdown, start
    from raylm.tuning.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("serve")
    files = {}
    for tag, answer in ANSWERS.items():
        files[tag] = tmp / f"{tag}.jsonl"
        files[tag].write_text(
            "".join(
                json.dumps({"instruction": f"{i}+{j}", "input": "", "output": answer}) + "\n"
                for i in range(20)
                for j in range(10)
            )
        )
    job = tiny_job(
        tmp,
        name="srv",
        data={"train": str(files["a"]), "num_examples": None},
        scaling={"num_workers": 1, "cpus_per_worker": 0.9},
        training={"max_steps": 30, "eval_every": 30, "lr": 1e-2, "eval_exact_match": True},
        tune={
            "num_samples": 1,
            "scheduler": "none",
            "top_k": 2,
            "search": {"data.train": {"grid": [str(files["a"]), str(files["b"])]}},
        },
        serve={
            "api_key_env": KEY_ENV,
            "port": free_port(),
            "max_batch_size": 4,
            "max_ongoing_requests": 8,
            "max_prompt_tokens": 64,
            "max_new_tokens": 32,
            "max_body_bytes": 4096,
            # Wait up to 0.1 s for a batch to fill while others are in flight: tiny answers
            # finish so fast that batches would otherwise rarely hold more than one request.
            "batch_wait_timeout_s": 0.1,
            "num_cpus": 0.5,
        },
    )
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_job(path)
    sweep = run_sweep(spec)
    os.environ[KEY_ENV] = KEY
    trial_of, checkpoint_of = {}, {}  # "a"/"b" → served name / checkpoint of that file's trial
    for entry in sweep.manifest["top_k"]:
        tag = "a" if entry["config"]["data.train"] == str(files["a"]) else "b"
        trial_of[tag] = f"srv-{entry['trial_id']}"
        checkpoint_of[tag] = entry["checkpoint"]
    # "metered": trial a again under a name only the metrics test asks, so its token counters
    # start at zero whatever the other tests sent.
    plan = resolve_target(str(path), adapters=[f"metered={checkpoint_of['a']}"])
    url = start(plan)
    yield {
        "url": url,
        "plan": plan,
        "manifest": sweep.manifest,
        "trial_of": trial_of,
        "checkpoint_of": checkpoint_of,
    }
    shutdown()
    os.environ.pop(KEY_ENV, None)


def client(served, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, body: bytes | str, headers: dict[str, str] | None = None, method: str = "POST"):
    """Raw HTTP: (status, parsed JSON body)."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(
        url,
        data=data if method in ("POST", "PUT") else None,
        method=method,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {KEY}",
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_winner_and_each_top_k_trial(served):
    import openai

    ids = [m.id for m in client(served).models.list().data]
    assert ids[0] == "srv" and set(served["trial_of"].values()) <= set(ids)
    assert ids[-1] == "metered" and len(ids) == 4
    assert client(served).models.retrieve("metered").id == "metered"
    with pytest.raises(openai.NotFoundError):
        client(served).models.retrieve("nope")


def test_openai_client_completion_chat_and_stream_match_in_process_generate(served):
    import torch

    from raylm.checkpoint import load_for_inference

    c = client(served)
    tok, model = load_for_inference(served["manifest"]["checkpoint"])
    meta = json.load(open(os.path.join(served["manifest"]["checkpoint"], "raylm.json")))

    def local(ids: list[int]) -> str:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    messages = [{"role": "user", "content": "13+4"}]
    chat = c.chat.completions.create(model="srv", messages=messages, max_tokens=8, temperature=0)
    # An instruction model is asked through the template it was trained with: built here from
    # the checkpoint's own record, not by the server's formatting code.
    assert meta["data_format"] == "instruction" and meta["template"] == "{instruction}="
    prompt = meta["template"].replace("{instruction}", "13+4").replace("{input}", "")
    expected = local(tok(prompt)["input_ids"])
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].message.content in ANSWERS.values()
    assert chat.usage.completion_tokens >= 1 and chat.choices[0].finish_reason == "stop"

    comp = c.completions.create(model="srv", prompt="19+2=", max_tokens=8, temperature=0)
    assert comp.choices[0].text == local(tok("19+2=")["input_ids"])

    stream = c.chat.completions.create(
        model="srv", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_stream_is_sse_chunks_ending_in_done(served):
    req = urllib.request.Request(
        served["url"] + "/v1/chat/completions",
        data=json.dumps(
            {
                "messages": [{"role": "user", "content": "3+3"}],
                "stream": True,
                "max_tokens": 4,
                "temperature": 0,
            }
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_stream_usage_content_parts_and_roles_as_openais_client_sends_them(served):
    c = client(served)
    messages = [{"role": "user", "content": "13+4"}]
    plain = c.chat.completions.create(model="srv", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].message.refusal is None
    chunks = list(
        c.chat.completions.create(
            model="srv",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # OpenAI's shape: usage null on every chunk but the last, which has no choices.
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == plain.choices[0].message.content
    # Content as a list of text parts, as the SDKs and chat front ends send it.
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "13"}, {"type": "text", "text": "+4"}],
        }
    ]
    same = c.chat.completions.create(model="srv", messages=parts, max_tokens=8, temperature=0)
    assert same.choices[0].message.content == plain.choices[0].message.content
    # developer (system's successor), a system prompt alone, an assistant prefill: all answered.
    for convo in (
        [{"role": "developer", "content": "be brief"}, *messages],
        [{"role": "system", "content": "be brief"}],
        [*messages, {"role": "assistant", "content": "1"}],
        [{"role": "user", "content": ""}],
    ):
        r = c.chat.completions.create(model="srv", messages=convo, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length"), convo
    # top_p 0 is greedy, as temperature 0 is.
    greedy = c.chat.completions.create(model="srv", messages=messages, max_tokens=8, top_p=0)
    assert greedy.choices[0].message.content == plain.choices[0].message.content


def test_n_choices_are_seeded_and_a_prompt_list_answers_as_one_by_one(served):
    c = client(served)

    def three() -> list[str]:
        r = c.completions.create(
            model="srv", prompt="7+8=", max_tokens=6, temperature=1.5, n=3, seed=42
        )
        assert [ch.index for ch in r.choices] == [0, 1, 2]
        return [ch.text for ch in r.choices]

    first = three()
    assert three() == first  # the seed decides all three
    # best_of: of best_of seeded candidates (candidate i has seed + i), the likeliest per token
    ask = {"model": "srv", "prompt": "7+8=", "max_tokens": 6, "temperature": 1.5}
    best = c.completions.create(**ask, seed=42, best_of=3)
    cands = [c.completions.create(**ask, seed=42 + i, logprobs=0) for i in range(3)]

    def per_token(r) -> float:
        lps = r.choices[0].logprobs.token_logprobs
        return sum(lps) / len(lps)

    assert best.choices[0].text == max(cands, key=per_token).choices[0].text
    assert best.choices[0].logprobs is None  # computed to rank, not asked for
    assert best.usage.completion_tokens == sum(r.usage.completion_tokens for r in cands)
    prompts = ["1+1=", "12+3=", "9+9="]
    batched = c.completions.create(model="srv", prompt=prompts, max_tokens=6, temperature=0)
    alone = [
        c.completions.create(model="srv", prompt=p, max_tokens=6, temperature=0) for p in prompts
    ]
    assert [ch.text for ch in batched.choices] == [a.choices[0].text for a in alone]
    from raylm.client import Client  # raylm's own client passes OpenAI's parameters through

    mine = Client(served["url"], api_key=KEY).completion(
        prompts, model="srv", max_tokens=6, temperature=0, logprobs=0
    )
    assert [ch["text"] for ch in mine["choices"]] == [ch.text for ch in batched.choices]
    assert all(len(ch["logprobs"]["tokens"]) >= 1 for ch in mine["choices"])
    from raylm.checkpoint import load_for_inference

    tok, _ = load_for_inference(served["manifest"]["checkpoint"])
    assert [a.usage.prompt_tokens for a in alone] == [len(tok(p)["input_ids"]) for p in prompts]
    assert batched.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batched.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    # token ids are the same prompt as its text
    by_ids = c.completions.create(
        model="srv", prompt=tok(prompts[1])["input_ids"], max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == alone[1].choices[0].text
    # streamed, each choice's chunks carry its index and end with its own finish_reason
    chunks = list(
        c.completions.create(
            model="srv", prompt=prompts[:2], max_tokens=6, temperature=0, stream=True
        )
    )
    for i, a in enumerate(alone[:2]):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert "".join(x.text for x in mine) == a.choices[0].text
        assert mine[-1].finish_reason == a.choices[0].finish_reason


def test_logit_bias_nulls_and_whole_floats_over_http(served):
    c = client(served)
    from raylm.checkpoint import load_for_inference

    tok, _ = load_for_inference(served["manifest"]["checkpoint"])
    seven = tok.convert_tokens_to_ids("7")
    r = c.completions.create(
        model="srv",
        prompt="1+1=",
        max_tokens=3,
        temperature=0,
        logit_bias={str(seven): 100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == "777" and r.choices[0].finish_reason == "length"
    nulls = {k: None for k in ("stream", "temperature", "n", "stop", "seed", "logprobs", "top_p")}
    got, body = post(
        served["url"] + "/v1/completions",
        json.dumps({"prompt": "1+1=", "max_tokens": 3.0, **nulls}),
    )
    assert got == 200 and body["usage"]["completion_tokens"] <= 3, body


def _in_process_log_softmax(served, ids: list[int]):
    """log-softmax of the exported winner's logits at every position of `ids`, computed here
    with transformers alone."""
    import torch

    from raylm.checkpoint import load_for_inference

    _, model = load_for_inference(served["manifest"]["checkpoint"])
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_logprobs_and_echo_scores_equal_the_in_process_model(served):
    from raylm.checkpoint import load_for_inference

    c = client(served)
    tok, _ = load_for_inference(served["manifest"]["checkpoint"])
    chat = c.chat.completions.create(
        model="srv",
        messages=[{"role": "user", "content": "13+4"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert "".join(x.token for x in content) == chat.choices[0].message.content
    prompt = tok("13+4=")["input_ids"]  # the checkpoint's template, as the first test shows
    generated = [tok.convert_tokens_to_ids(x.token) for x in content]
    ref = _in_process_log_softmax(served, prompt + generated)
    for i, x in enumerate(content):
        row = ref[len(prompt) - 1 + i]
        assert x.logprob == pytest.approx(float(row[generated[i]]), abs=1e-4)
        assert x.bytes == list(x.token.encode())
        values, top = row.topk(2)
        assert [tok.convert_tokens_to_ids(t.token) for t in x.top_logprobs] == top.tolist()
        assert [t.logprob for t in x.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)

    # echo + max_tokens 0: the prompt scored token by token, the first token's logprob null.
    text = "12+30=42"
    echo = c.completions.create(
        model="srv", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text == text and echo.usage.completion_tokens == 0
    ids = tok(text)["input_ids"]
    ref = _in_process_log_softmax(served, ids)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    # <s> is scored but left out of the text; every other token is its piece of the text.
    assert lp.tokens[0] == tok.bos_token and lp.text_offset[:2] == [0, 0]
    assert "".join(lp.tokens[1:]) == text
    for piece, at in zip(lp.tokens[1:], lp.text_offset[1:], strict=True):
        assert text[at : at + len(piece)] == piece


def test_multiple_choice_picked_by_http_log_likelihood_is_the_in_process_pick(served):
    """How evaluation harnesses run multiple-choice sets: score each choice as the continuation
    of its question with echo + max_tokens 0, pick the likeliest. The served pick equals the
    pick made in process with transformers on the exported model."""
    from raylm.checkpoint import load_for_inference

    c = client(served)
    tok, _ = load_for_inference(served["manifest"]["checkpoint"])
    questions = [f"{i}+{j}=" for i, j in ((1, 2), (5, 5), (30, 7), (11, 0), (8, 16), (2, 90))]
    choices = ["42", "7", "13", "100"]
    served_picks, local_picks = [], []
    for q in questions:
        scores_http, scores_local = [], []
        r = c.completions.create(
            model="srv", prompt=[q + a for a in choices], max_tokens=0, echo=True, logprobs=0
        )
        for a, choice in zip(choices, r.choices, strict=True):
            lp = choice.logprobs
            # the choice's tokens: those that start at or after the question's end
            pairs = zip(lp.token_logprobs, lp.text_offset, strict=True)
            scores_http.append(sum(v for v, off in pairs if off >= len(q)))
            ids, n_ctx = tok(q + a)["input_ids"], len(tok(q)["input_ids"])
            ref = _in_process_log_softmax(served, ids)
            scores_local.append(sum(float(ref[i - 1, ids[i]]) for i in range(n_ctx, len(ids))))
        assert scores_http == pytest.approx(scores_local, abs=1e-3), q
        served_picks.append(max(range(len(choices)), key=scores_http.__getitem__))
        local_picks.append(max(range(len(choices)), key=scores_local.__getitem__))
    assert served_picks == local_picks
    # The winner learned one answer for everything: it picks that one, whatever the question.
    picked = {choices[p] for p in served_picks}
    assert len(picked) == 1 and picked <= set(ANSWERS.values()), picked


def test_json_schema_output_parses_and_validates_on_20_prompts(served):
    import jsonschema

    c = client(served)
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["42", "7", "other"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}}
    for i in range(20):
        r = c.chat.completions.create(
            model="srv",
            messages=[{"role": "user", "content": f"{i}+{i * 7}"}],
            max_tokens=32,
            temperature=1.0,
            seed=i,
            response_format=fmt,
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    mode = c.chat.completions.create(
        model="srv",
        messages=[{"role": "user", "content": "1+1"}],
        max_tokens=32,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert mode.choices[0].message.content.lstrip().startswith("{")


def test_openais_own_schema_calls_the_answers_valid_and_the_requests_answered(served, capsys):
    """Property-based conformance (schemathesis) against OpenAI's published OpenAPI document,
    trimmed to the text subset (tests/openai_subset.py says what and why): valid requests are
    answered, invalid ones refused with a 4xx, no 5xx, every answer and stream event on OpenAI's
    response schema."""
    from raylm.checkpoint import load_for_inference

    from .openai_subset import PLATFORM_ONLY, run_conformance, table

    tok, model = load_for_inference(served["manifest"]["checkpoint"])
    vocab = min(len(tok), int(model.config.vocab_size))
    records = run_conformance(served["url"] + "/v1", KEY, "srv", vocab, examples=100, seed=7)
    valid = [r for r in records if r["valid"]]
    answered = [r for r in valid if 200 <= r["status"] < 300]
    with capsys.disabled():  # the table belongs in every run's output
        print(
            f"\n{table(records)}\nschema-valid requests answered: {len(answered)} of {len(valid)}"
        )
    assert not [r for r in records if r["status"] >= 500], table(records)
    off_schema = [r for r in answered if r["failure"]]
    assert not off_schema, (off_schema[0]["body"], off_schema[0]["failure"])
    invalid = [r for r in records if not r["valid"]]
    accepted_invalid = [r for r in invalid if r["failure"] or not 400 <= r["status"] < 500]
    assert not accepted_invalid, (accepted_invalid[0]["body"], accepted_invalid[0]["failure"])
    assert len(invalid) >= 150 and len(valid) >= 150
    assert len(answered) >= 0.95 * len(valid), table(records)
    unsupported = {f for fields in PLATFORM_ONLY.values() for f in fields}
    for r in valid:
        if r not in answered:  # a refusal must name a field the README lists as unsupported
            assert r["status"] == 400, r
            assert json.loads(r["answer"])["error"]["param"] in unsupported, r


def test_two_adapters_answer_differently_by_model(served):
    c = client(served)
    got = {}
    for tag, name in served["trial_of"].items():
        r = c.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "11+5"}], max_tokens=6, temperature=0
        )
        got[tag] = r.choices[0].message.content
    assert got == ANSWERS  # each trial says what it was trained to say


def test_concurrent_mixed_adapter_requests_batch_without_mixing_answers(served):
    c = client(served)
    names = [served["trial_of"]["a"], served["trial_of"]["b"]] * 6

    def ask(name: str) -> tuple[str, str]:
        r = c.completions.create(model=name, prompt="8+1=", max_tokens=6, temperature=0)
        return name, r.choices[0].text

    def multi() -> float:
        """Batches so far that held 2+ requests: all batches less those in the `le="1"` bucket
        (a histogram's buckets count every batch of at most that size)."""
        text = prometheus_text()
        bucket = "ray_raylm_batch_size_bucket"
        single = sum(metric_total(text, bucket, le=le) for le in ("1", "1.0"))
        return metric_total(text, "ray_raylm_batch_size_count") - single

    before = multi()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, names))
    want = {served["trial_of"][t]: a for t, a in ANSWERS.items()}
    assert all(text == want[name] for name, text in results), results
    # Metrics are exported every few seconds: poll until a batch of 2+ shows up.
    deadline = time.monotonic() + 60
    while multi() <= before and time.monotonic() < deadline:
        time.sleep(1)
    assert multi() > before, prometheus_text()[-3000:]


def test_one_batch_of_two_adapters_answers_as_each_does_alone(served):
    from raylm.serving.engine import Engine, Sampling

    cks = served["checkpoint_of"]
    engine = Engine([("a", cks["a"]), ("b", cks["b"])])
    ids = engine.encode_prompt("8+1=")
    greedy = Sampling(max_tokens=6)
    together = engine.generate([("a", ids, greedy), ("b", ids, greedy), ("a", ids, greedy)])
    alone = [engine.generate([(m, ids, greedy)])[0] for m in ("a", "b", "a")]
    assert [c.text for c in together] == [c.text for c in alone] == ["42", "7", "42"]


def _bad_requests(url: str) -> list[tuple[str, str, bytes | str, dict[str, str], int]]:
    comp, chat = url + "/v1/completions", url + "/v1/chat/completions"
    big = json.dumps({"prompt": "9" * 5000})
    return [
        ("malformed json", comp, '{"prompt": ', {}, 400),
        ("json array", comp, '["x"]', {}, 400),
        ("wrong content type", comp, '{"prompt": "x"}', {"Content-Type": "text/plain"}, 415),
        ("invalid utf-8", comp, b'{"prompt": "\xff\xfe"}', {}, 400),
        ("NaN temperature", comp, '{"prompt": "x", "temperature": NaN}', {}, 400),
        ("huge max_tokens", comp, '{"prompt": "x", "max_tokens": 100000000000}', {}, 400),
        ("max_tokens over limit", comp, '{"prompt": "x", "max_tokens": 33}', {}, 400),
        ("string max_tokens", comp, '{"prompt": "x", "max_tokens": "4"}', {}, 400),
        ("negative temperature", comp, '{"prompt": "x", "temperature": -1}', {}, 400),
        ("negative top_p", comp, '{"prompt": "x", "top_p": -0.5}', {}, 400),
        ("empty token-id list", comp, '{"prompt": [[]]}', {}, 400),
        ("prompt list of string lists", comp, '{"prompt": [["a"]]}', {}, 400),
        ("prompt over token limit", comp, json.dumps({"prompt": "1" * 200}), {}, 400),
        ("token id not in the vocabulary", comp, '{"prompt": [1, 999999]}', {}, 400),
        ("best_of below n", comp, '{"prompt": "x", "best_of": 2, "n": 3}', {}, 400),
        ("best_of streamed", comp, '{"prompt": "x", "best_of": 2, "stream": true}', {}, 400),
        ("best_of over max_n", comp, '{"prompt": ["x", "y"], "best_of": 5}', {}, 400),
        ("unknown field", comp, '{"prompt": "x", "bestof": 2}', {}, 400),
        (
            "bad stream flag",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "stream": 1}',
            {},
            400,
        ),
        ("unknown model", comp, '{"prompt": "x", "model": "gpt-9"}', {}, 404),
        ("no messages", chat, '{"messages": []}', {}, 400),
        ("bad role", chat, '{"messages": [{"role": "wizard", "content": "x"}]}', {}, 400),
        (
            "tool message",
            chat,
            '{"messages": [{"role": "tool", "content": "x", "tool_call_id": "t"}]}',
            {},
            400,
        ),
        ("too many stops", comp, '{"prompt": "x", "stop": ["1","2","3","4","5"]}', {}, 400),
        ("n over serve.max_n", comp, '{"prompt": "x", "n": 9}', {}, 400),
        ("prompts × n over serve.max_n", comp, '{"prompt": ["x", "y", "z"], "n": 3}', {}, 400),
        ("unknown field, null", comp, '{"prompt": "x", "": null, "foo": null}', {}, 400),
        (
            "top_logprobs without logprobs",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            {},
            400,
        ),
        ("oversize body", comp, big, {}, 413),
        ("missing API key", comp, '{"prompt": "x"}', {"Authorization": ""}, 401),
        ("wrong API key", comp, '{"prompt": "x"}', {"Authorization": "Bearer nope"}, 401),
        ("wrong auth scheme", comp, '{"prompt": "x"}', {"Authorization": f"Basic {KEY}"}, 401),
        ("unknown route", url + "/v1/embeddings", '{"input": "x"}', {}, 404),
        # -- bodies that are not a request object
        ("empty body", comp, "", {}, 400),
        ("null body", comp, "null", {}, 400),
        ("bare string", comp, '"2+2="', {}, 400),
        ("bare number", comp, "42", {}, 400),
        ("deeply nested JSON", comp, '{"prompt": ' + "[" * 1500 + "]" * 1500 + "}", {}, 400),
        ("trailing garbage", comp, '{"prompt": "x"} {"prompt": "y"}', {}, 400),
        ("single quotes", comp, "{'prompt': 'x'}", {}, 400),
        (
            "form content type",
            comp,
            "prompt=x",
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
        ),
        (
            "json content type misspelt",
            comp,
            '{"prompt": "x"}',
            {"Content-Type": "application/jsonx"},
            415,
        ),
        ("latin-1 body", comp, '{"prompt": "caf\xe9"}'.encode("latin-1"), {}, 400),
        ("truncated utf-8", comp, b'{"prompt": "\xe2\x82"}', {}, 400),
        # -- wrong types and values, field by field
        ("prompt of strings and ids", comp, '{"prompt": ["a", 1]}', {}, 400),
        ("prompt number", comp, '{"prompt": 5}', {}, 400),
        ("prompt object", comp, '{"prompt": {"text": "x"}}', {}, 400),
        (
            "logit_bias id not in the vocabulary",
            comp,
            '{"prompt": "x", "logit_bias": {"999999": 5}}',
            {},
            400,
        ),
        ("logit_bias word key", comp, '{"prompt": "x", "logit_bias": {"hello": 5}}', {}, 400),
        ("logit_bias 101", comp, '{"prompt": "x", "logit_bias": {"5": 101}}', {}, 400),
        ("prompt lone surrogate", comp, '{"prompt": "a\\ud800b"}', {}, 400),
        ("string temperature", comp, '{"prompt": "x", "temperature": "0.5"}', {}, 400),
        ("temperature 3", comp, '{"prompt": "x", "temperature": 3}', {}, 400),
        ("Infinity temperature", comp, '{"prompt": "x", "temperature": Infinity}', {}, 400),
        ("1e400 temperature", comp, '{"prompt": "x", "temperature": 1e400}', {}, 400),
        ("top_p 1.5", comp, '{"prompt": "x", "top_p": 1.5}', {}, 400),
        (
            "min_tokens over max_tokens",
            comp,
            '{"prompt": "x", "max_tokens": 2, "min_tokens": 3}',
            {},
            400,
        ),
        ("max_tokens -1", comp, '{"prompt": "x", "max_tokens": -1}', {}, 400),
        ("max_tokens 1.5", comp, '{"prompt": "x", "max_tokens": 1.5}', {}, 400),
        ("max_tokens true", comp, '{"prompt": "x", "max_tokens": true}', {}, 400),
        (
            "max_tokens 10^30",
            comp,
            '{"prompt": "x", "max_tokens": 1000000000000000000000000000000}',
            {},
            400,
        ),
        ("seed over OpenAI's bound", comp, '{"prompt": "x", "seed": 9223372036854776001}', {}, 400),
        ("seed float", comp, '{"prompt": "x", "seed": 1e30}', {}, 400),
        ("stop object", comp, '{"prompt": "x", "stop": {"a": 1}}', {}, 400),
        ("numeric stop", comp, '{"prompt": "x", "stop": [1]}', {}, 400),
        ("stream string", comp, '{"prompt": "x", "stream": "yes"}', {}, 400),
        ("stream_options string", comp, '{"prompt": "x", "stream_options": "yes"}', {}, 400),
        ("presence_penalty 3", comp, '{"prompt": "x", "presence_penalty": 3}', {}, 400),
        ("top_k -2", comp, '{"prompt": "x", "top_k": -2}', {}, 400),
        ("repetition_penalty 0", comp, '{"prompt": "x", "repetition_penalty": 0}', {}, 400),
        ("suffix", comp, '{"prompt": "x", "suffix": "y"}', {}, 400),
        ("empty model name", comp, '{"prompt": "x", "model": ""}', {}, 400),
        ("numeric model name", comp, '{"prompt": "x", "model": 123}', {}, 400),
        ("n = 0", comp, '{"prompt": "x", "n": 0}', {}, 400),
        ("numeric user", comp, '{"prompt": "x", "user": 5}', {}, 400),
        ("logprobs 6", comp, '{"prompt": "x", "logprobs": 6}', {}, 400),
        # -- chat-specific
        ("messages not a list", chat, '{"messages": {"role": "user", "content": "x"}}', {}, 400),
        ("message without content", chat, '{"messages": [{"role": "user"}]}', {}, 400),
        ("numeric content", chat, '{"messages": [{"role": "user", "content": 7}]}', {}, 400),
        (
            "message unknown field",
            chat,
            '{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}',
            {},
            400,
        ),
        (
            "image content part",
            chat,
            '{"messages": [{"role": "user", "content": [{"type": "image_url", '
            '"image_url": {"url": "http://x"}}]}]}',
            {},
            400,
        ),
        (
            "tools",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
            '"function": {"name": "f"}}]}',
            {},
            400,
        ),
        (
            "json_schema without its schema",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], '
            '"response_format": {"type": "json_schema"}}',
            {},
            400,
        ),
        (
            "top_logprobs 21",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}',
            {},
            400,
        ),
        ("prompt sent to chat", chat, '{"prompt": "x"}', {}, 400),
        (
            "messages sent to completions",
            comp,
            '{"messages": [{"role": "user", "content": "x"}]}',
            {},
            400,
        ),
        (
            "max_completion_tokens -1",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}',
            {},
            400,
        ),
        (
            "unknown model in chat",
            chat,
            '{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            {},
            404,
        ),
        # -- streams refused before the first event (the stream path checks limits too)
        (
            "stream with prompt over limit",
            comp,
            json.dumps({"prompt": "1" * 200, "stream": True}),
            {},
            400,
        ),
        (
            "stream with max_tokens over limit",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 33, "stream": true}',
            {},
            400,
        ),
        (
            "stream to unknown model",
            comp,
            '{"prompt": "x", "model": "nope", "stream": true}',
            {},
            404,
        ),
        # -- keys
        ("bearer without token", comp, '{"prompt": "x"}', {"Authorization": "Bearer"}, 401),
        ("key with extra text", comp, '{"prompt": "x"}', {"Authorization": f"Bearer {KEY}x"}, 401),
        ("key only, no scheme", comp, '{"prompt": "x"}', {"Authorization": KEY}, 401),
        ("unknown versioned route", url + "/v2/completions", '{"prompt": "x"}', {}, 404),
    ]


def test_bad_requests_get_4xx_openai_errors_and_the_app_keeps_serving(served):
    cases = _bad_requests(served["url"])
    assert len(cases) >= 50
    statuses = []
    for name, url, body, headers, status in cases:
        got, payload = post(url, body, headers)
        statuses.append(got)
        assert got == status, (name, got, payload)
        err = payload["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, name
    for method in ("GET", "PUT", "DELETE"):  # wrong methods on a real route
        got, payload = post(served["url"] + "/v1/completions", '{"prompt": "x"}', method=method)
        statuses.append(got)
        assert got == 405 and payload["error"]["message"], (method, got)
    got, payload = post(served["url"] + "/v1/models", "", {"Authorization": ""}, method="GET")
    statuses.append(got)
    assert got == 401 and payload["error"]["code"] == "invalid_api_key"
    assert not [s for s in statuses if s >= 500]
    print(
        f"bad HTTP requests: {len(statuses)} sent, {sum(400 <= s < 500 for s in statuses)} 4xx, "
        f"{sum(s >= 500 for s in statuses)} 5xx"
    )
    # still serving after every one of those
    r = client(served).completions.create(model="srv", prompt="2+2=", max_tokens=4, temperature=0)
    assert r.choices[0].text in ANSWERS.values()
    with urllib.request.urlopen(served["url"] + "/health", timeout=10) as resp:  # no key needed
        assert json.loads(resp.read())["status"] == "ok"


def test_the_api_key_never_reaches_a_log_file(served):
    import uuid

    import ray

    # Requests with the right key, a wrong one and a malformed header; then one whose request
    # id is a fresh marker. Serve writes access logs asynchronously, in order: once the marker
    # is in a log, the keyed requests before it are logged too.
    c = client(served)
    c.completions.create(model="srv", prompt="1+1=", max_tokens=2, temperature=0)
    post(served["url"] + "/v1/completions", '{"prompt": "x"}', {"Authorization": f"Bearer {KEY}-x"})
    post(served["url"] + "/v1/completions", '{"prompt": "x"}', {"Authorization": f"Token {KEY}"})
    # Serve logs each request under its id, and takes the id a client sends.
    marker = f"marker-{uuid.uuid4().hex}"
    assert post(served["url"] + "/v1/models", "", {"X-Request-Id": marker}, method="GET")[0] == 200
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")

    def read_all() -> dict[str, bytes]:
        out = {}
        for root, _, files in os.walk(logs):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    out[os.path.join(root, name)] = f.read()
        return out

    deadline = time.monotonic() + 60
    contents = read_all()
    while not any(marker.encode() in b for b in contents.values()):
        assert time.monotonic() < deadline, "the marker request never reached a log file"
        time.sleep(0.5)
        contents = read_all()
    leaks = [os.path.basename(p) for p, b in contents.items() if KEY.encode() in b]
    assert len(contents) > 10 and not leaks, leaks


def test_wrong_key_through_the_openai_client_is_an_authentication_error(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").completions.create(model="srv", prompt="1", max_tokens=2)


def test_token_and_batch_metrics_reach_rays_prometheus_endpoint(served):
    # "metered" is asked by this test alone: its counters count exactly this request.
    r = client(served).completions.create(
        model="metered", prompt="5+5=", max_tokens=4, temperature=0
    )
    got = wait_for_metric("ray_raylm_generated_tokens", r.usage.completion_tokens, model="metered")
    assert got == r.usage.completion_tokens >= 1
    got = wait_for_metric("ray_raylm_prompt_tokens", r.usage.prompt_tokens, model="metered")
    assert got == r.usage.prompt_tokens == len("5+5=") + 1  # characters + <s>
    assert metric_total(prometheus_text(), "ray_raylm_batch_size_count") >= 1
