"""`raylm run` end to end on the test's Ray: sweep → gate → served winner → HTTP answer; re-runs
reuse finished stages; a changed job is refused; a gate that cannot pass serves nothing; storage
that cannot work on the cluster is refused before training; cloud-style (`file://`) storage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raylm.job import load_job

from .conftest import REPO, tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


def raylm_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def write_job(tmp_path, **sections) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(tmp_path, **sections)))
    return str(path)


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def free_killed_jobs_placement_groups(driver_pid: int, wait_s: float = 60.0) -> None:
    """Waits for Ray to free what a SIGKILLed driver's job held. Ray Train's own cleaner normally
    removes a dead run's placement group; when it does not, later tests would wait forever for
    the CPUs, so the leftover is removed here, and said."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_jobs, list_placement_groups

    job_ids = {
        j.job_id for j in list_jobs() if j.driver_info and j.driver_info.pid == str(driver_pid)
    }
    deadline = time.time() + wait_s
    while True:
        left = [
            pg
            for pg in list_placement_groups(filters=[("state", "=", "CREATED")])
            if pg.creator_job_id in job_ids
        ]
        if not left:
            return
        if time.time() > deadline:
            break
        time.sleep(1)
    for pg in left:
        print(f"Ray left placement group {pg.placement_group_id} of the killed job; removing it")
        ray.util.remove_placement_group(
            PlacementGroup(PlacementGroupID(bytes.fromhex(pg.placement_group_id)))
        )


def test_cli_run_killed_mid_sweep_resumes_then_serves_and_a_rerun_reuses_the_finished_sweep(
    ray_cluster, tmp_path
):
    from .test_tune_ray import tune_state

    port = free_port()
    job = write_job(
        tmp_path,
        name="e2e",
        scaling={"num_workers": 1, "cpus_per_worker": 0.9},
        training={"max_steps": 30, "eval_every": 10},
        tune={
            "num_samples": 1,
            "scheduler": "none",
            "max_concurrent_trials": 1,
            "search": {"training.lr": {"grid": [1e-3, 1e-2]}},
        },
        serve={"port": port, "num_cpus": 0.5, "promote_if": {"eval_loss": {"max": 50.0}}},
    )
    # The driver is killed (SIGKILL, whole process group) once the first trial has finished and
    # the second has reported its first eval (its workers are up: not mid-start).
    sweep_root = str(tmp_path / "runs" / "e2e" / "sweep")
    log_path = tmp_path / "killed.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "run", job, "--address", ray_cluster],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )
    deadline = time.time() + 400
    try:
        while not (
            any(t["status"] == "TERMINATED" for t in tune_state(sweep_root).values())
            and len(set(re.findall(r"\[raylm tune\] trial (\S+) step 0/", log_path.read_text())))
            >= 2
        ):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    free_killed_jobs_placement_groups(proc.pid)
    # Workers' output reaches the driver, but not Ray Train's INFO repr of every report and
    # checkpoint upload.
    killed_log = log_path.read_text()
    assert "(RayTrainWorker pid=" in killed_log
    assert "Reporting training result" not in killed_log
    assert "Checkpoint successfully created" not in killed_log
    before = tune_state(sweep_root)
    finished = {tid: t for tid, t in before.items() if t["status"] == "TERMINATED"}
    assert len(finished) == 1, before
    assert not (tmp_path / "runs" / "e2e" / "run.json").exists()  # the sweep stage never completed

    first = raylm_cli("run", job, "--detach", "--address", ray_cluster)
    try:
        assert first.returncode == 0, first.stderr[-3000:]
        out = first.stdout
        assert "winner:          sweep: trial" in out and "(reused)" not in out
        after = tune_state(sweep_root)
        assert len(after) == 2 and all(t["status"] == "TERMINATED" for t in after.values())
        for (
            tid,
            t,
        ) in finished.items():  # same start and last step: the finished trial did not re-run
            assert after[tid]["start_time"] == t["start_time"] and after[tid]["step"] == t["step"]
        assert f"url:             http://127.0.0.1:{port}/v1" in out
        assert "[raylm run] stage 2/3 gate: eval_loss=" in out
        sample = next(line for line in out.splitlines() if line.startswith("sample:"))
        assert "'12+7' →" in sample
        # the served winner answers over HTTP, as the printed sample did
        got = post_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {"prompt": "12+7=", "max_tokens": 4, "temperature": 0},
        )
        assert got["model"] == "e2e" and got["usage"]["completion_tokens"] >= 1
        record = json.loads((tmp_path / "runs" / "e2e" / "run.json").read_text())
        trials = sorted(os.listdir(tmp_path / "runs" / "e2e" / "sweep" / "trials"))
        assert record["stage"] == "sweep" and len(trials) == 2

        t0 = time.monotonic()
        again = raylm_cli("run", job, "--detach", "--address", ray_cluster)
        rerun_s = time.monotonic() - t0
        assert again.returncode == 0, again.stderr[-3000:]
        assert "winner:          sweep (reused): " + record["detail"] in again.stdout
        assert (
            sorted(os.listdir(tmp_path / "runs" / "e2e" / "sweep" / "trials")) == trials
        )  # no new trials
        assert json.loads((tmp_path / "runs" / "e2e" / "run.json").read_text()) == record
        print(f"re-run with the sweep reused: {rerun_s:.1f}s")

        changed = raylm_cli(
            "run", job, "training.max_steps=40", "--address", ray_cluster, timeout=60
        )
        assert changed.returncode == 2, changed.stdout[-2000:]
        assert "training.max_steps: 30 → 40" in changed.stderr and "--force" in changed.stderr
    finally:
        down = raylm_cli("shutdown", "--address", ray_cluster, timeout=120)
    assert "stopped the raylm Serve app" in down.stdout


def test_a_gate_that_cannot_pass_serves_nothing_and_the_cli_exits_3(ray_cluster, tmp_path):
    import raylm
    from raylm.errors import GateFailed

    job = write_job(
        tmp_path,
        name="gated",
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        training={"max_steps": 10, "eval_every": 10},
        serve={
            "port": free_port(),
            "num_cpus": 0.5,
            "promote_if": {"eval_loss": {"max": 1e-6}, "exact_match": {"min": 0.99}},
        },
    )
    with pytest.raises(GateFailed) as info:
        raylm.run(load_job(job))
    failures = " | ".join(info.value.failures)
    assert "eval_loss=" in failures and "above the maximum 1e-06" in failures
    assert "exact_match=" in failures and "below the minimum 0.99" in failures
    assert raylm.shutdown() is False  # no raylm Serve app was started

    cli = raylm_cli(
        "run", job, "--address", ray_cluster
    )  # reuses the finished training, gate again
    assert cli.returncode == 3, cli.stderr[-2000:]
    assert (
        "the evaluation gate refused the winner" in cli.stderr
        and "nothing was served" in cli.stderr
    )
    assert "stage 1/3 train: reused finished run" in cli.stdout
    assert raylm.shutdown() is False


def test_local_storage_is_refused_before_training_when_workers_need_other_nodes(
    ray_cluster, tmp_path
):
    # This node has no GPU, so GPU workers would land on other nodes: local disk cannot hold
    # their checkpoints. Refused with exit 2 before any training starts.
    job = write_job(tmp_path, name="gpu-on-cpu", scaling={"num_workers": 1, "use_gpu": True})
    out = raylm_cli("train", job, "--address", ray_cluster, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "is a local directory" in out.stderr and "s3://" in out.stderr
    assert not (tmp_path / "runs" / "gpu-on-cpu").exists()


def test_run_with_a_uri_storage_path_keeps_its_records_through_pyarrow(ray_cluster, tmp_path):
    import raylm
    from raylm.checkpoint import META_FILE
    from raylm.serving.deploy import plan_for_job
    from raylm.storage import local_dir

    store = tmp_path / "bucket"
    job = write_job(
        tmp_path,
        name="uri",
        storage_path=f"file://{store}",
        scaling={"num_workers": 1, "cpus_per_worker": 1},
        training={"max_steps": 10, "eval_every": 10},
    )
    spec = load_job(job)
    result = raylm.run(spec, serve=False)
    # Ray resolves file:// to its local filesystem: checkpoints are plain paths under the URI's dir.
    assert result.winner.checkpoint.startswith(f"{store}/uri/checkpoint_")
    record = json.loads((store / "uri" / "run.json").read_text())  # written through pyarrow
    assert record["checkpoint"] == result.winner.checkpoint and "eval_loss" in record["metrics"]
    assert (store / "uri" / "loss_curve.png").stat().st_size > 0  # report uploaded next to the run
    assert plan_for_job(spec).models[0][1] == result.winner.checkpoint  # found by listing the URI
    assert raylm.run(spec, serve=False).winner.reused

    # A checkpoint on a non-local filesystem is fetched once into the local cache, whole.
    import pyarrow.fs

    remote = pyarrow.fs.SubTreeFileSystem(str(store), pyarrow.fs.LocalFileSystem())
    rel = os.path.relpath(result.winner.checkpoint, store)
    cached = local_dir(rel, cache=str(tmp_path / "cache"), filesystem=remote)
    assert cached.startswith(str(tmp_path / "cache")) and os.path.exists(
        os.path.join(cached, ".complete")
    )
    assert json.loads(open(os.path.join(cached, META_FILE)).read())["metrics"] == record["metrics"]
    assert sorted(os.listdir(cached)) == sorted(
        [*os.listdir(result.winner.checkpoint), ".complete"]
    )

    # --force trains again and moves the finished run aside (through pyarrow), never deleting it.
    old_files = sorted(p.relative_to(store / "uri") for p in (store / "uri").rglob("*"))
    forced = raylm.run(spec, force=True, serve=False)
    assert not forced.winner.reused and forced.moved_aside is not None
    aside = Path(forced.moved_aside.removeprefix("file://"))
    assert aside.name.startswith("uri.replaced-")
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == old_files
    assert json.loads((aside / "run.json").read_text()) == record
    new_record = json.loads((store / "uri" / "run.json").read_text())
    assert new_record["checkpoint"].startswith(f"{store}/uri/checkpoint_")
