"""`raylm submit` / `raylm jobs` against a real Ray head started with `ray start --head` on
127.0.0.1 (its own ports, beside the session's Ray), through Ray's Jobs API with token auth."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raylm.job import load_job

from .conftest import tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


SECRET_ENV, SECRET = "RAYLM_SUBMIT_KEY", "sk-submit-7f3a9c1e5b"
HEAD: dict[str, str] = {}  # the test head's temp dir, for reading its logs


def raylm_cli(cwd, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, SECRET_ENV: SECRET},
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A second, separate Ray head (2 CPUs) with its dashboard/Jobs API; stopped afterwards."""
    from raylm.submit import jobs_client

    dash = free_port()
    env = dict(os.environ)
    # The job's entrypoint `raylm run` must be on the head's PATH (cluster.yaml installs it there).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    # Its own temp dir: `ray start` records "the current cluster" there, not in /tmp/ray where a
    # later plain `ray.init()` would find this (by then stopped) head and try to join it.
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a limit
    HEAD["temp_dir"] = temp_dir
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    deadline, last = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        try:
            jobs_client(url).list_jobs()
            break
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(1)
    else:
        stop(proc)
        pytest.fail(f"ray start --head did not bring up the Jobs API at {url}: {last}")
    yield url
    stop(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to `ray start --block` stops every process of its node (SIGTERM would orphan them)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A job with a local data file named by a relative path, beside things that must not travel."""
    d = tmp_path_factory.mktemp("submit")
    (d / "data.jsonl").write_text(
        "".join(
            json.dumps({"instruction": f"{a}+{b}", "input": "", "output": str(a + b)}) + "\n"
            for a in range(20)
            for b in range(20)
        )
    )
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (d / "runs").mkdir()
    (d / "notes.txt").write_text("not part of the job\n")
    job = tiny_job(
        d,
        name="sub",
        storage_path=str(d / "cluster-runs"),
        data={"train": "data.jsonl", "num_examples": None},
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        training={"max_steps": 10, "eval_every": 10},
        serve={"port": free_port(), "num_cpus": 0.5, "api_key_env": SECRET_ENV},
    )
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    return d


def test_stage_job_carries_the_job_and_its_data_only(job_dir, tmp_path, monkeypatch):
    from raylm.submit import build_runtime_env, entrypoint, stage_job

    monkeypatch.chdir(job_dir)
    spec = load_job("job.yaml", ["training.lr=1e-3"])
    staged = stage_job(spec, tmp_path / "wd")
    files = sorted(str(p.relative_to(tmp_path / "wd")) for p in (tmp_path / "wd").rglob("*"))
    assert files == ["files", "files/0-data.jsonl", "job.yaml"]
    carried = yaml.safe_load((tmp_path / "wd" / "job.yaml").read_text())
    assert carried["data"]["train"] == "files/0-data.jsonl"
    assert carried["training"]["lr"] == 1e-3  # overrides travel inside the job file
    assert carried["storage_path"] == str(job_dir / "cluster-runs")
    assert (tmp_path / "wd" / "files" / "0-data.jsonl").read_bytes() == (
        job_dir / "data.jsonl"
    ).read_bytes()
    monkeypatch.setenv(SECRET_ENV, SECRET)
    env = build_runtime_env(staged, pip=["optuna"])
    # the serving key travels by name from this machine's environment, not in the job file
    assert env == {
        "working_dir": str(tmp_path / "wd"),
        "pip": ["optuna"],
        "env_vars": {SECRET_ENV: SECRET},
    }
    assert SECRET not in (tmp_path / "wd" / "job.yaml").read_text()
    assert entrypoint(["--detach"]) == "raylm run job.yaml --detach"


def test_relative_local_storage_goes_under_the_cluster_home():
    from raylm.submit import cluster_storage_path

    assert cluster_storage_path("./runs") == "~/raylm/runs"
    assert cluster_storage_path("s3://bucket/runs") == "s3://bucket/runs"
    assert cluster_storage_path("/mnt/shared/runs") == "/mnt/shared/runs"


def test_submit_runs_the_job_on_the_head_and_jobs_logs_list_and_stop_work(head, job_dir):
    spec_port = yaml.safe_load((job_dir / "job.yaml").read_text())["serve"]["port"]
    out = raylm_cli(job_dir, "submit", "job.yaml", "--address", head)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert f"carrying {job_dir / 'data.jsonl'} → files/0-data.jsonl" in out.stdout
    job_id = next(w for w in out.stdout.split() if w.startswith("raylm-sub-"))
    assert "[raylm] step 10/10" in out.stdout and "=== raylm run: done ===" in out.stdout
    assert out.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    # the run's records are where the job's storage_path says, and its winner is served there
    assert (
        json.loads((job_dir / "cluster-runs" / "sub" / "run.json").read_text())["stage"] == "train"
    )
    req = urllib.request.Request(
        f"http://127.0.0.1:{spec_port}/v1/completions",
        data=json.dumps({"prompt": "3+4=", "max_tokens": 3}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert json.loads(resp.read())["model"] == "sub"

    logs = raylm_cli(job_dir, "jobs", "logs", job_id, "--address", head, timeout=120)
    assert logs.returncode == 0 and "=== raylm run: done ===" in logs.stdout

    long = raylm_cli(
        job_dir,
        "submit",
        "job.yaml",
        "name=long",
        "training.max_steps=100000",
        "--no-wait",
        "--no-serve",
        "--address",
        head,
        timeout=120,
    )
    assert long.returncode == 0, long.stderr[-2000:]
    long_id = next(w for w in long.stdout.split() if w.startswith("raylm-long-"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # stop it once it is really training
        if (
            "[raylm] step"
            in raylm_cli(job_dir, "jobs", "logs", long_id, "--address", head, timeout=60).stdout
        ):
            break
        time.sleep(3)
    else:
        pytest.fail("the long job never started training")
    stop = raylm_cli(job_dir, "jobs", "stop", long_id, "--address", head, timeout=120)
    assert stop.returncode == 0 and f"{long_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    listed = raylm_cli(job_dir, "jobs", "list", "--address", head, timeout=60).stdout
    assert (
        f"{job_id}" in listed
        and "SUCCEEDED" in listed
        and f"{long_id}" in listed
        and "STOPPED" in listed
    )
    status = raylm_cli(job_dir, "jobs", "status", long_id, "--address", head, timeout=60)
    assert status.stdout.startswith(f"{long_id}: STOPPED")

    # The serving key went through the runtime_env (the server above wanted it) and was never
    # echoed: not by raylm's commands, not in the job's logs, not in the run's records.
    said = [out, logs, long, stop, status]
    assert not [p.args[3:5] for p in said if SECRET in p.stdout + p.stderr]
    assert SECRET not in listed
    records = [p for p in (job_dir / "cluster-runs").rglob("*") if p.is_file()]
    assert records and not [p for p in records if SECRET.encode() in p.read_bytes()]
    raylm_logs = [p for p in Path(HEAD["temp_dir"]).rglob("job-driver-*.log")]
    assert raylm_logs and not [p for p in raylm_logs if SECRET.encode() in p.read_bytes()]


def test_jobs_without_the_clusters_token_fail_clearly(head, job_dir, tmp_path):
    wrong = {**os.environ, "RAY_AUTH_TOKEN": "not-the-token"}
    # No token at all: none in the environment and an empty home (no ~/.ray/auth_token).
    none = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    none["HOME"] = str(tmp_path)
    for env in (wrong, none):
        for args in (["jobs", "list"], ["submit", "job.yaml", "--no-wait"]):
            out = subprocess.run(
                [sys.executable, "-m", "raylm.cli", *args, "--address", head],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=job_dir,
                env={**env, SECRET_ENV: SECRET},
            )
            assert out.returncode in (1, 2), (args, out.stdout[-500:])
            err = out.stderr.lower()
            assert f"raylm {args[0]}" in err or "could not submit" in err, out.stderr[-1000:]
            assert "token" in err or "401" in err or "unauthor" in err, out.stderr[-1000:]
            assert "Traceback" not in out.stderr
