"""`raylm submit` / `raylm jobs` against a real two-node Ray cluster started from the shell: a
head with no CPUs (`ray start --head`, the drivers and the Jobs API live there) and a worker node
with 2 CPUs (`ray start --address=…`), each its own raylet on 127.0.0.1 beside the session's
Ray, through Ray's Jobs API with token auth. The job's training and serving land on the worker
node; Ray's State API says so."""

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
import uuid
from pathlib import Path

import pytest
import yaml

from .test_serve_ray import free_port
from .test_submit import SECRET, SECRET_ENV, make_job_dir

pytestmark = pytest.mark.ray


HEAD: dict[str, str] = {}  # the test head's temp dir, for reading its logs
# Token auth is set explicitly for the head and for raylm, never read from a file on this machine.
TOKEN = f"raylm-test-token-{uuid.uuid4().hex}"
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
CARRIED_ENV, CARRIED = "RAYLM_TEST_CARRIED", "carried-7d1e"


def raylm_cli(cwd, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **AUTH, SECRET_ENV: SECRET, CARRIED_ENV: CARRIED},
    )


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A second, separate Ray cluster with its dashboard/Jobs API and token auth: a head with
    no CPUs and one worker node with 2; stopped afterwards."""
    from ray.job_submission import JobSubmissionClient

    dash = free_port()
    env = {**os.environ, **AUTH}
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
            "--num-cpus=0",
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
    # The worker node gets its own temp dir, as a second machine would have its own disk. Two
    # raylets on one host sharing one session dir share `runtime_resources/`, and the worker
    # node's runtime-env agent then deletes the job's unpacked working_dir under the driver
    # still running in it on the head (seen: `getcwd` ENOENT, "oneMKL FATAL ERROR").
    worker_temp_dir = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            f"--address=127.0.0.1:{ports['--port']}",
            "--block",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={worker_temp_dir}",
            *(
                f"{k}={free_port()}"
                for k in (
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--metrics-export-port",
                    "--runtime-env-agent-port",
                )
            ),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, last = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        try:
            JobSubmissionClient(url, headers={"Authorization": f"Bearer {TOKEN}"}).list_jobs()
            break
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(1)
    else:
        stop(worker)
        stop(proc)
        pytest.fail(f"ray start --head did not bring up the Jobs API at {url}: {last}")
    yield url
    stop(worker)
    stop(proc)
    shutil.rmtree(temp_dir, ignore_errors=True)
    shutil.rmtree(worker_temp_dir, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to `ray start --block` stops every process of its node (SIGTERM would orphan them)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    return make_job_dir(tmp_path_factory.mktemp("submit"), serve_port=free_port())


def cluster_state(head: str, what: str, **filters: str) -> list:
    """Ray's State API on the test cluster (nodes or actors), with its token as the header."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=head, headers={"Authorization": f"Bearer {TOKEN}"})
    options = ListApiOptions(limit=1000, filters=[(k, "=", v) for k, v in filters.items()])
    return client.list(StateResource[what.upper()], options, raise_on_missing_output=False)


def test_submit_runs_the_job_on_the_cluster_and_jobs_logs_list_and_stop_work(head, job_dir):
    spec_port = yaml.safe_load((job_dir / "job.yaml").read_text())["serve"]["port"]
    # Every node mounts this directory (one host): the job says so, as a multi-node run must.
    out = raylm_cli(job_dir, "submit", "job.yaml", "storage_shared=true", "--address", head)
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
    # The driver ran on the head; the training workers and the model replica on the worker node.
    nodes = {n.node_id: n.is_head_node for n in cluster_state(head, "nodes")}
    assert sorted(nodes.values()) == [False, True], nodes
    placed = {
        cls: {a.node_id for a in cluster_state(head, "actors", class_name=cls)}
        for cls in ("RayTrainWorker", "ServeReplica:raylm:Model")
    }
    assert all(where and not any(nodes[n] for n in where) for where in placed.values()), placed

    logs = raylm_cli(job_dir, "jobs", "logs", job_id, "--address", head, timeout=120)
    assert logs.returncode == 0 and "=== raylm run: done ===" in logs.stdout

    long = raylm_cli(
        job_dir,
        "submit",
        "job.yaml",
        "name=long",
        "storage_shared=true",
        "training.max_steps=100000",
        "--no-wait",
        "--no-serve",
        "--pip",
        "six",
        "--env",
        CARRIED_ENV,
        "--address",
        head,
        timeout=120,
    )
    assert long.returncode == 0, long.stderr[-2000:]
    long_id = next(w for w in long.stdout.split() if w.startswith("raylm-long-"))
    assert CARRIED not in long.stdout + long.stderr  # carried by name, its value never printed
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
    # It trained inside the runtime_env raylm built: the pip package and the variable by name.
    from raylm.submit import jobs_client

    with pytest.MonkeyPatch.context() as env:  # restored after: other tests' Ray needs its own
        for name, value in AUTH.items():
            env.setenv(name, value)
        runtime_env = jobs_client(head).get_job_info(long_id).runtime_env
    assert "six" in json.dumps(runtime_env["pip"])
    assert runtime_env["env_vars"][CARRIED_ENV] == CARRIED
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
    wrong = {**os.environ, **AUTH, "RAY_AUTH_TOKEN": "not-the-token"}
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
