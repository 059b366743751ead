"""`raylm submit` without a cluster: what a staged job carries, where its runs go on the
cluster, and where Ray's auth token is found."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raylm.job import load_job

from .conftest import tiny_job

SECRET_ENV, SECRET = "RAYLM_SUBMIT_KEY", "sk-submit-7f3a9c1e5b"


def make_job_dir(d: Path, serve_port: int = 8000) -> Path:
    """A job with a local data file named by a relative path, beside things that must not travel."""
    d.mkdir(parents=True, exist_ok=True)
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
        serve={"port": serve_port, "num_cpus": 0.5, "api_key_env": SECRET_ENV},
    )
    (d / "job.yaml").write_text(yaml.safe_dump(job))
    return d


def test_stage_job_carries_the_job_and_its_data_only(tmp_path, monkeypatch):
    job_dir = make_job_dir(tmp_path / "job")
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


def test_auth_token_is_found_where_ray_finds_it(tmp_path, monkeypatch):
    from raylm.submit import auth_token

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None  # none anywhere
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "tok").write_text(" from-path ")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"  # the variable wins over files
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None  # auth switched off: send nothing
