"""Commands without `--address` on a machine with a local Ray head: a detached `raylm serve`
leaves one running, and later commands attach to it and say so; a head that was killed leaves
Ray's current-cluster file behind, and the next command starts a fresh Ray and says so.

Each test has its own RAY_TMPDIR, so its heads and Ray's current-cluster file are its own."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
import yaml

from .conftest import REPO, tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR (Ray's socket paths have a length limit); every Ray process
    started under it is stopped afterwards."""
    tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    yield tmp
    for proc in processes_under(tmp):
        proc.kill()


def processes_under(tmp: str) -> list[psutil.Process]:
    """Ray's processes of the heads started under `tmp` (their command lines name it)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(tmp in a for a in proc.info["cmdline"] or []):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def cli(tmp: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def write_job(tmp_path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            tiny_job(
                tmp_path,
                name="local",
                scaling={"num_workers": 1, "cpus_per_worker": 1},
                training={"max_steps": 5, "eval_every": 5},
            )
        )
    )
    return str(path)


def test_serve_detach_then_shutdown_then_train_uses_the_running_local_head(ray_tmp, tmp_path):
    from raylm.models import materialize_tiny_llama

    port = free_port()
    served = cli(
        ray_tmp,
        "serve",
        str(materialize_tiny_llama()),
        "--detach",
        f"serve.port={port}",
        "serve.num_cpus=0.5",
    )
    assert served.returncode == 0, served.stderr[-3000:]
    assert "starting a local Ray head" in served.stdout and "`ray stop`" in served.stdout
    head = open(os.path.join(ray_tmp, "ray", "ray_current_cluster")).read().strip()
    down = cli(ray_tmp, "shutdown")
    assert down.returncode == 0 and "stopped the raylm Serve app" in down.stdout, down.stderr
    trained = cli(ray_tmp, "train", write_job(tmp_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "When connecting to an existing cluster" not in trained.stderr
    assert f"using the local Ray head at {head}" in trained.stdout
    assert "=== raylm train: done ===" in trained.stdout
    # The run really was a driver of that head: its session logs hold one for this process.
    sessions = glob.glob(os.path.join(ray_tmp, "ray", "session_*", "logs"))
    drivers = [f for s in sessions for f in glob.glob(os.path.join(s, "python-core-driver-*"))]
    assert len(drivers) >= 2, drivers  # the detached serve's and the train's


def test_a_killed_local_head_means_a_fresh_local_ray_said_in_one_line(ray_tmp, tmp_path):
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--num-cpus=1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )
    assert started.returncode == 0, started.stderr[-2000:]
    head = open(os.path.join(ray_tmp, "ray", "ray_current_cluster")).read().strip()
    victims = processes_under(ray_tmp)
    assert victims, "no head processes found"
    for proc in victims:  # the head dies without `ray stop`: killed, out of memory, a reboot
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    time.sleep(1)
    assert os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster"))  # left behind

    trained = cli(ray_tmp, "train", write_job(tmp_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "When connecting to an existing cluster" not in trained.stderr
    said = [line for line in trained.stdout.splitlines() if "is gone" in line]
    assert said == [
        f"[raylm] the local Ray head recorded at {head} is gone (killed or rebooted); "
        "starting a fresh local Ray"
    ], trained.stdout[-2000:]
    assert "=== raylm train: done ===" in trained.stdout
