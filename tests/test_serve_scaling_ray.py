"""Serve's autoscaler under real HTTP load (replicas rise above min_replicas and fall back), and
the `raylm serve --detach` / `raylm shutdown` commands against the test's Ray cluster."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from .conftest import REPO, endless_llama, tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("raylm")
    if app is None:
        return 0
    return app.deployments["Model"].replica_states.get("RUNNING", 0)


def test_replicas_scale_up_under_load_and_back_down(ray_cluster):
    from raylm.models import materialize_tiny_llama
    from raylm.serving.deploy import resolve_target, shutdown, start

    port = free_port()
    plan = resolve_target(
        str(materialize_tiny_llama()),
        [
            f"serve.port={port}",
            "serve.num_cpus=0.5",
            "serve.max_batch_size=2",
            "serve.max_ongoing_requests=4",
            "serve.autoscaling.min_replicas=1",
            "serve.autoscaling.max_replicas=2",
            "serve.autoscaling.target_ongoing_requests=1",
            "serve.autoscaling.upscale_delay_s=1",
            "serve.autoscaling.downscale_delay_s=3",
            "serve.autoscaling.metrics_interval_s=0.5",
            "serve.autoscaling.look_back_period_s=2",
        ],
    )
    url = start(plan)
    try:
        assert running_replicas() == 1
        body = json.dumps({"prompt": "1 2 3", "max_tokens": 48, "temperature": 0}).encode()
        stop, answers, errors = threading.Event(), [], []

        def load() -> None:
            while not stop.is_set():
                req = urllib.request.Request(
                    url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                )
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        answers.append(json.loads(resp.read())["choices"][0]["text"])
                except (urllib.error.URLError, OSError) as exc:
                    errors.append(repr(exc))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        peak, deadline = 1, time.monotonic() + 60
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, running_replicas())
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert peak == 2, "no upscale under 8 concurrent clients"
        assert answers and not errors, errors[:3]
        assert len(set(answers)) == 1  # greedy: every replica answers the same prompt alike
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and running_replicas() > 1:
            time.sleep(0.5)
        assert running_replicas() == 1, "did not scale back down after the load ended"
    finally:
        shutdown()


def test_cli_serve_detach_prints_a_working_curl_line_and_shutdown_stops_it(ray_cluster, tmp_path):
    from raylm.models import materialize_tiny_llama

    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "serve",
            str(materialize_tiny_llama()),
            f"serve.port={port}",
            "serve.num_cpus=0.5",
            "--name",
            "tiny",
            "--detach",
            "--address",
            ray_cluster,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"http://127.0.0.1:{port}/v1" in out.stdout
    curl = next(line for line in out.stdout.splitlines() if line.startswith("try:"))
    argv = shlex.split(curl.removeprefix("try:").strip())
    assert argv[0] == "curl" and argv[1] == f"http://127.0.0.1:{port}/v1/chat/completions"
    body = argv[argv.index("-d") + 1]
    req = urllib.request.Request(
        argv[1], data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:  # the printed request, sent as printed
        answer = json.loads(resp.read())
    assert answer["model"] == "tiny" and answer["object"] == "chat.completion"
    # Hot sampling sometimes ends at once: an empty answer is a 200 like any other.
    usages = []
    for seed in range(40):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {"prompt": "1 2", "max_tokens": 3, "temperature": 2.0, "seed": seed}
            ).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            usages.append(json.loads(resp.read())["usage"]["completion_tokens"])
    assert 0 in usages and max(usages) > 0, usages

    down = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "shutdown", "--address", ray_cluster],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr[-2000:]
    assert running_replicas() == 0
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_answers_run_to_their_limits_with_the_openai_defaults(ray_cluster, tmp_path):
    """A model that never ends a text by itself: every answer stops at its token limit, so the
    defaults (16 for completions, `serve.max_new_tokens` for chat) show exactly. Served with
    `serve.batching: continuous`: greedy requests join the running batch (concurrent answers equal
    in-process `generate`), seeded sampling still goes through the static path."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from raylm.serving.deploy import resolve_target, shutdown, start
    from raylm.serving.engine import Engine, Sampling

    model = endless_llama(tmp_path)
    url = start(
        resolve_target(
            model,
            [
                f"serve.port={free_port()}",
                "serve.num_cpus=0.5",
                "serve.max_new_tokens=24",
                "serve.batching=continuous",
            ],
        )
    )
    c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chat = [{"role": "user", "content": "1 2"}]
    try:
        engine = Engine([("endless-llama", model)])
        asks = [(f"{i} {i + 1}", 3 + 2 * i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            got = list(
                pool.map(
                    lambda a: c.completions.create(
                        model="endless-llama", prompt=a[0], max_tokens=a[1], temperature=0
                    ),
                    asks,
                )
            )
        expected = engine.generate(
            [("endless-llama", engine.encode_prompt(p), Sampling(max_tokens=n)) for p, n in asks]
        )
        assert [g.choices[0].text for g in got] == [e.text for e in expected]
        assert [g.usage.completion_tokens for g in got] == [n for _, n in asks]
        comp = c.completions.create(model="endless-llama", prompt="1 2", temperature=0)
        assert comp.usage.completion_tokens == 16 and comp.choices[0].finish_reason == "length"
        answer = c.chat.completions.create(model="endless-llama", messages=chat, temperature=0)
        assert answer.usage.completion_tokens == 24  # the job's serve.max_new_tokens
        assert answer.choices[0].finish_reason == "length"
        one = c.chat.completions.create(
            model="endless-llama", messages=chat, temperature=0, max_completion_tokens=1
        )
        assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
        seven = c.completions.create(model="endless-llama", prompt="5", max_tokens=7, temperature=0)
        assert seven.usage.completion_tokens == 7 and seven.choices[0].finish_reason == "length"
        stream = list(
            c.completions.create(
                model="endless-llama", prompt="5", max_tokens=7, temperature=0, stream=True
            )
        )
        assert "".join(ch.choices[0].text for ch in stream) == seven.choices[0].text
        assert stream[-1].choices[0].finish_reason == "length"

        def sample(seed: int) -> str:
            r = c.completions.create(
                model="endless-llama", prompt="5", max_tokens=12, temperature=1.0, seed=seed
            )
            assert r.usage.completion_tokens == 12
            return r.choices[0].text

        assert sample(1) == sample(1) != sample(2)  # the seed decides, and temperature is used
    finally:
        shutdown()


def test_full_queue_answers_503_and_the_app_recovers(ray_cluster):
    from concurrent.futures import ThreadPoolExecutor

    from raylm.client import Client, ServerError
    from raylm.models import materialize_tiny_llama
    from raylm.serving.deploy import resolve_target, shutdown, start

    port = free_port()
    url = start(
        resolve_target(
            str(materialize_tiny_llama()),
            [
                f"serve.port={port}",
                "serve.num_cpus=0.5",
                "serve.max_batch_size=1",
                "serve.max_ongoing_requests=1",
                "serve.max_queued_requests=1",
                "serve.max_new_tokens=400",
            ],
        )
    )
    # "abc" makes the tiny model count on without stopping: each request holds the replica.
    body = json.dumps({"prompt": "abc", "max_tokens": 400, "temperature": 0}).encode()

    def send(_: int) -> tuple[int, str | None, bytes]:
        req = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, None, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Retry-After"), err.read()

    def send_with_client(_: int) -> tuple[int, int]:
        c = Client(url, retries=1)
        try:
            c.completion("abc", max_tokens=400, temperature=0)
            return 200, c.retried
        except ServerError as exc:
            return exc.status, c.retried

    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(send, range(12)))
        codes = [a[0] for a in answers]
        assert codes.count(503) >= 1 and codes.count(200) >= 2, codes
        assert set(codes) <= {200, 503}, codes
        # the gateway's 503: an OpenAI-style JSON error with Retry-After, not a bare text page
        status, retry_after, raw = next(a for a in answers if a[0] == 503)
        assert retry_after == "1" and json.loads(raw)["error"]["code"] == "service_unavailable"
        assert send(0)[0] == 200  # the queue drained; the replica is still there
        # raylm's client waits Retry-After and tries a 503 once more
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(send_with_client, range(12)))
        assert {code for code, _ in outcomes} <= {200, 503}, outcomes
        assert sum(r for _, r in outcomes) >= 1, outcomes
        assert all(r <= 1 for _, r in outcomes)
    finally:
        shutdown()


def test_a_chat_trained_checkpoint_is_served_through_its_tokenizers_chat_template(
    ray_cluster, tmp_path
):
    import torch
    from openai import OpenAI

    from raylm.checkpoint import load_for_inference
    from raylm.job import spec_from_dict
    from raylm.serving.deploy import resolve_target, shutdown, start
    from raylm.training.trainer import run_train

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Add."},
                        {"role": "user", "content": f"{a}+{b}"},
                        {"role": "assistant", "content": str(a + b)},
                    ]
                }
            )
            + "\n"
            for a in range(20)
            for b in range(10)
        )
    )
    result = run_train(
        spec_from_dict(
            tiny_job(
                tmp_path,
                name="chat",
                data={"train": str(data), "format": "chat", "num_examples": None, "max_length": 64},
                scaling={"num_workers": 1, "cpus_per_worker": 1},
                training={"max_steps": 10, "eval_every": 10},
            )
        )
    )
    ckpt = result.best_checkpoint
    tok, model = load_for_inference(ckpt)
    messages = [{"role": "system", "content": "Add."}, {"role": "user", "content": "13+4"}]
    # Built here from the checkpoint's own tokenizer, not by the server's formatting code.
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert tok.decode(ids).endswith("<|assistant|>\n")
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
    expected = tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    url = start(resolve_target(ckpt, [f"serve.port={free_port()}", "serve.num_cpus=0.5"]))
    try:
        c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = c.chat.completions.create(
            model="chat", messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content == expected
        assert answer.usage.prompt_tokens == len(ids)  # the whole templated conversation
    finally:
        shutdown()
