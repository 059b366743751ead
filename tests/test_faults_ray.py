"""Fault injection on real Ray, after Ray's own fault tests: SIGKILL a training worker mid-run,
kill a checkpoint copy half-way, damage the latest checkpoint, SIGKILL a Serve replica under load.
Each test checks what survives: steps, weights, which checkpoint is loaded, failed requests."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings

import pytest
import yaml

from raylm.checkpoint import (
    CHECKSUMS,
    best_run_checkpoint,
    checkpoint_problems,
    read_metadata,
    seal,
)
from raylm.job import load_job, spec_from_dict
from raylm.training.trainer import run_train

from .conftest import REPO, metric_total, prometheus_text, tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


def registered_steps(run_dir) -> list[int]:
    """Checkpoint steps Ray's checkpoint manager has recorded (what a restart resumes from)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except FileNotFoundError:
        return []

    return sorted({int(m) for m in re.findall(r"checkpoint_(\d{7})", text)})


def exact_job(tmp_path, name: str, **more) -> dict:
    """ZeRO-2 LoRA with dropout: resuming must restore weights, Adam, data order and RNG."""
    return tiny_job(
        tmp_path,
        name=name,
        lora={"dropout": 0.1},
        training={
            "max_steps": 40,
            "eval_every": 10,
            "lr_schedule": "constant",
            "warmup_ratio": 0.0,
        },
        **more,
    )


def evals(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}


def test_sigkilled_worker_restarts_from_its_last_checkpoint_and_ends_like_an_uninterrupted_run(
    ray_cluster, tmp_path
):
    from ray.util.state import list_actors
    from safetensors.torch import load_file

    straight = run_train(spec_from_dict(exact_job(tmp_path, "straight")))

    spec = spec_from_dict(exact_job(tmp_path, "killed", failure={"max_failures": 1}))
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_train(spec)), daemon=True)
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while not registered_steps(run_dir):
        assert thread.is_alive() and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.1)
    seen = registered_steps(run_dir)[-1]
    workers = [
        a
        for a in list_actors(
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        )
    ]
    assert len(workers) == 2, workers
    os.kill(workers[-1].pid, signal.SIGKILL)  # one worker of two, mid-run
    killed_at = time.time()
    thread.join(timeout=600)
    assert "result" in out, "the run did not finish after the worker was killed"
    result = out["result"]

    meta = read_metadata(result.checkpoint)
    assert meta["step"] == 40 == read_metadata(straight.checkpoint)["step"]
    # One restart, and it continued from a checkpoint Ray had when the worker died.
    assert len(meta["resumes"]) == 1, meta["resumes"]
    resumed_at = meta["resumes"][0]
    assert seen <= resumed_at < 40 and resumed_at % 10 == 0, (seen, resumed_at)
    steps = [h["step"] for h in result.history]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step counted twice
    assert evals(result.history).keys() == evals(straight.history).keys() == {0, 10, 20, 30, 40}
    for step, loss in evals(straight.history).items():
        assert evals(result.history)[step] == pytest.approx(loss, abs=1e-5), step
    a = load_file(os.path.join(straight.checkpoint, "train_state", "optim.safetensors"))
    b = load_file(os.path.join(result.checkpoint, "train_state", "optim.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"weights/moments after the restart drifted by {worst}"
    alive = {
        w.pid
        for w in list_actors(
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        )
    }
    assert workers[-1].pid not in alive
    print(
        f"faults: 1 worker SIGKILL at checkpoint step {seen}; resumed from {resumed_at}; "
        f"run ended {time.time() - killed_at:.0f}s after the kill; max weight diff {worst:.1e}"
    )


def test_a_checkpoint_copy_killed_half_way_is_never_taken_and_a_damaged_latest_falls_back(
    ray_cluster, tmp_path
):
    # keep: 5, so Ray's retention never deletes a checkpoint this test looks at.
    job = tiny_job(
        tmp_path,
        name="damaged",
        training={"max_steps": 20, "eval_every": 10},
        checkpoint={"keep": 5},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_job(path)
    first = run_train(spec)
    run_dir = tmp_path / "runs" / "damaged"
    assert checkpoint_problems(first.checkpoint) == []

    # 1. A copy killed half-way. Ray persists a checkpoint with pyarrow's copy_files into
    # <run>/<checkpoint_dir_name>; kill that copy mid-file. The source is a whole checkpoint with
    # the best metric ever (so it would win if it were believed) and 1 GiB to copy.
    src = tmp_path / "src"
    shutil.copytree(first.checkpoint, src)
    meta = json.loads((src / "raylm.json").read_text())
    meta["metrics"]["eval_loss"] = 0.0
    (src / "raylm.json").write_text(json.dumps(meta))
    with open(src / "padding.dat", "wb") as f:
        f.truncate(1 << 30)
    seal(src)
    assert checkpoint_problems(src) == []
    dst = run_dir / "checkpoint_9999999"
    total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    for _ in range(3):  # the copy must be caught part-way; very rarely it wins the race
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        copier = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, pyarrow.fs as f; f.copy_files(sys.argv[1], sys.argv[2])",
                str(src),
                str(dst),
            ]
        )
        while copier.poll() is None and not any(
            p.stat().st_size for p in dst.rglob("*") if p.is_file()
        ):
            time.sleep(0.001)
        copier.send_signal(signal.SIGKILL)
        copier.wait()
        copied = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        if 0 < copied < total:
            break
    assert 0 < copied < total, "the copy was never caught part-way"
    problems = checkpoint_problems(dst)
    assert problems, "a half-written checkpoint passed its checks"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = best_run_checkpoint(spec)
    assert chosen is not None and os.path.basename(chosen) != dst.name
    assert checkpoint_problems(chosen) == []
    assert any(dst.name in str(w.message) for w in caught), [str(w.message) for w in caught]

    # 2. Ray's latest checkpoint damaged on disk (one byte flipped, size unchanged): the resume
    # names it, skips it, and continues from the previous whole one.
    latest = run_dir / "checkpoint_0000020"
    assert registered_steps(run_dir)[-1] == 20
    weights = latest / "train_state" / "optim.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    damaged = bytes(raw)
    assert any("sha256" in p for p in checkpoint_problems(latest))
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "train",
            str(path),
            "training.max_steps=30",
            "--address",
            ray_cluster,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "checkpoint_0000020 is damaged, not loading it" in log, log[-3000:]
    assert "resuming from the previous good checkpoint" in log and "checkpoint_0000010" in log
    last = next(line for line in rerun.stdout.splitlines() if line.startswith("last checkpoint:"))
    final = last.split(":", 1)[1].strip()
    assert checkpoint_problems(final) == [] and read_metadata(final)["step"] == 30
    assert read_metadata(final)["resumes"] == [10]
    best = best_run_checkpoint(spec)
    assert best is not None and checkpoint_problems(best) == [] and CHECKSUMS in os.listdir(best)
    # The re-done step 20 went to a new directory; the damaged original is still there, as it was.
    redone = run_dir / "checkpoint_0000020-1"
    assert read_metadata(redone)["step"] == 20 and checkpoint_problems(redone) == []
    assert weights.read_bytes() == damaged
    print(
        f"faults: 1 copy SIGKILL at {copied}/{total} bytes ({len(problems)} problems found); "
        "1 damaged latest checkpoint skipped, resumed from step 10"
    )


def replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications["raylm"]
    return dict(app.deployments["Model"].replica_states)


def live_replicas() -> list:
    from ray.util.state import list_actors

    return [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")])
        if a.class_name == "ServeReplica:raylm:Model"
    ]


def wait_for_two_replicas() -> None:
    deadline = time.monotonic() + 90
    while replica_states().get("RUNNING") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_states().get("RUNNING") == 2, replica_states()


@pytest.fixture(scope="module")
def two_replicas(ray_cluster):
    """The tiny Llama behind two model replicas; yields the base URL."""
    from raylm.models import materialize_tiny_llama
    from raylm.serving.deploy import resolve_target, shutdown, start

    plan = resolve_target(
        str(materialize_tiny_llama()),
        [
            f"serve.port={free_port()}",
            "serve.num_cpus=0.5",
            "serve.max_batch_size=4",
            "serve.max_ongoing_requests=8",
            "serve.autoscaling.min_replicas=2",
            "serve.autoscaling.max_replicas=2",
        ],
    )
    yield start(plan)
    shutdown()


def test_sigkilled_replica_under_load_loses_no_request_even_without_client_retries(two_replicas):
    from raylm.client import Client, ServerError

    url = two_replicas
    wait_for_two_replicas()
    retried_before = metric_total(prometheus_text(), "ray_raylm_replica_retries", kind="text")
    total, clients = 200, 16
    lock, sent, done = threading.Lock(), [0], []
    answers, failures = [], []

    def client_loop() -> None:
        c = Client(url, retries=0)  # a 503 would be a failure: only the gateway may retry
        while True:
            with lock:
                if sent[0] >= total:
                    break
                sent[0] += 1
            try:
                r = c.completion("1 2 3", max_tokens=12, temperature=0)
                answers.append(r["choices"][0]["text"])
            except (ServerError, OSError) as exc:
                failures.append(repr(exc))
            done.append(1)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    while len(done) < 40:
        time.sleep(0.01)
    victims = live_replicas()
    assert len(victims) == 2
    os.kill(victims[0].pid, signal.SIGKILL)
    done_at_kill = len(done)
    for t in threads:
        t.join(timeout=300)
    assert done_at_kill < total, "the load ended before the kill; nothing was in flight"
    assert len(done) == total
    retried = metric_total(prometheus_text(), "ray_raylm_replica_retries", kind="text")
    print(
        f"faults: 1 replica SIGKILL with {total - done_at_kill} of {total} requests left "
        f"({clients} clients, no client retries); failed {len(failures)}; retried by the "
        f"gateway {retried - retried_before:.0f}, the rest re-routed by Serve's router"
    )
    assert failures == [], failures[:3]
    assert len(answers) == total and len(set(answers)) == 1  # greedy: every replica agrees
    wait_for_two_replicas()
    with pytest.raises(ProcessLookupError):  # the count is back with a new process
        os.kill(victims[0].pid, 0)
    assert (
        Client(url).completion("1 2 3", max_tokens=12, temperature=0)["choices"][0]["text"]
        == answers[0]
    )


def test_streams_sent_right_after_a_replica_is_lost_all_arrive_whole(two_replicas):
    """Streams sent just after a replica died never reach the client broken: Serve's router
    routes around the dead replica, and one that reaches it anyway is retried by the gateway
    before its first event (counted in raylm_replica_retries)."""
    from concurrent.futures import ThreadPoolExecutor

    body = json.dumps({"prompt": "1 2 3", "max_tokens": 12, "temperature": 0, "stream": True})

    def stream(_: int) -> list[str]:
        req = urllib.request.Request(
            two_replicas + "/v1/completions",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            return [e for e in resp.read().decode().split("\n\n") if e]

    reference = "".join(json.loads(e[6:])["choices"][0]["text"] for e in stream(0)[:-1])
    retried = 0.0
    for _ in range(2):  # a burst right after each kill
        wait_for_two_replicas()
        before = metric_total(prometheus_text(), "ray_raylm_replica_retries", kind="text-stream")
        os.kill(live_replicas()[0].pid, signal.SIGKILL)
        with ThreadPoolExecutor(12) as pool:  # sent after the kill: none was mid-stream
            results = list(pool.map(stream, range(12)))
        for events in results:
            assert events[-1] == "data: [DONE]", events[-3:]
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert not [c for c in chunks if "error" in c], chunks
            assert "".join(c["choices"][0]["text"] for c in chunks) == reference
        retried += (
            metric_total(prometheus_text(), "ray_raylm_replica_retries", kind="text-stream")
            - before
        )
    print(
        f"faults: 2 bursts of 12 streams right after a replica SIGKILL: all whole; "
        f"{retried:.0f} retried by the gateway before their first event"
    )
