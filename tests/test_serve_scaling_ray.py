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

from .conftest import REPO
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


def test_cli_serve_refuses_bad_settings_and_a_missing_key_before_starting_anything(tmp_path):
    from raylm.models import materialize_tiny_llama

    target = str(materialize_tiny_llama())
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "serve",
            target,
            "serve.port=0",
            "serve.max_batch_size=32",
            "training.lr=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert "training.*: only serve.* settings apply" in bad.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "serve",
            target,
            "serve.port=0",
            "serve.autoscaling.max_replica=3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert (
        "serve.port=0" in bad.stderr and "serve.autoscaling.max_replica: unknown key" in bad.stderr
    )
    nokey = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "serve",
            target,
            "serve.api_key_env=RAYLM_UNSET_KEY_VAR",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert nokey.returncode == 2 and "RAYLM_UNSET_KEY_VAR" in nokey.stderr
    assert "Started a local Ray" not in nokey.stderr


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
