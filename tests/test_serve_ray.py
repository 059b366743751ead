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
    ids = [m.id for m in client(served).models.list().data]
    assert ids[0] == "srv" and set(served["trial_of"].values()) <= set(ids)
    assert ids[-1] == "metered" and len(ids) == 4


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
        ("top_p zero", comp, '{"prompt": "x", "top_p": 0}', {}, 400),
        ("empty prompt", comp, '{"prompt": ""}', {}, 400),
        ("missing prompt", comp, '{"max_tokens": 3}', {}, 400),
        ("prompt over token limit", comp, json.dumps({"prompt": "1" * 200}), {}, 400),
        ("control characters", comp, '{"prompt": "a\\u0007b"}', {}, 400),
        ("unknown field", comp, '{"prompt": "x", "best_of": 2}', {}, 400),
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
        ("no user turn", chat, '{"messages": [{"role": "system", "content": "x"}]}', {}, 400),
        ("too many stops", comp, '{"prompt": "x", "stop": ["1","2","3","4","5"]}', {}, 400),
        ("n = 2", comp, '{"prompt": "x", "n": 2}', {}, 400),
        (
            "two token limits",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, '
            '"max_completion_tokens": 2}',
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
        ("prompt list", comp, '{"prompt": ["a", "b"]}', {}, 400),
        ("prompt number", comp, '{"prompt": 5}', {}, 400),
        ("prompt null", comp, '{"prompt": null}', {}, 400),
        ("prompt NUL byte", comp, '{"prompt": "a\\u0000b"}', {}, 400),
        ("prompt lone surrogate", comp, '{"prompt": "a\\ud800b"}', {}, 400),
        ("string temperature", comp, '{"prompt": "x", "temperature": "0.5"}', {}, 400),
        ("temperature 3", comp, '{"prompt": "x", "temperature": 3}', {}, 400),
        ("Infinity temperature", comp, '{"prompt": "x", "temperature": Infinity}', {}, 400),
        ("1e400 temperature", comp, '{"prompt": "x", "temperature": 1e400}', {}, 400),
        ("top_p 1.5", comp, '{"prompt": "x", "top_p": 1.5}', {}, 400),
        ("max_tokens 0", comp, '{"prompt": "x", "max_tokens": 0}', {}, 400),
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
        ("seed -1", comp, '{"prompt": "x", "seed": -1}', {}, 400),
        ("seed float", comp, '{"prompt": "x", "seed": 1e30}', {}, 400),
        ("empty stop", comp, '{"prompt": "x", "stop": ""}', {}, 400),
        ("numeric stop", comp, '{"prompt": "x", "stop": [1]}', {}, 400),
        ("stream string", comp, '{"prompt": "x", "stream": "yes"}', {}, 400),
        ("stream null", comp, '{"prompt": "x", "stream": null}', {}, 400),
        ("empty model name", comp, '{"prompt": "x", "model": ""}', {}, 400),
        ("numeric model name", comp, '{"prompt": "x", "model": 123}', {}, 400),
        ("n = 0", comp, '{"prompt": "x", "n": 0}', {}, 400),
        ("long user", comp, json.dumps({"prompt": "x", "user": "u" * 300}), {}, 400),
        ("logprobs (unsupported)", comp, '{"prompt": "x", "logprobs": 2}', {}, 400),
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
            "control char in content",
            chat,
            '{"messages": [{"role": "user", "content": "a\\u001bb"}]}',
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
            "max_completion_tokens 0",
            chat,
            '{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}',
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
