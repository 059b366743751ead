"""`raylm submit` and `raylm jobs`: send a job to a Ray cluster through Ray's Jobs API.

The job travels as a small `runtime_env` working_dir built for it: the validated job file (with
command-line overrides applied) and copies of the local data and model files it names — never
the caller's working tree, `.git`, `.venv` or `runs/`. The entrypoint is `raylm run job.yaml` on
the cluster, so the cluster needs raylm installed (cluster.yaml's setup commands do that) or it
is named in `pip`. Ray's token authentication is handled by Ray's own client (RAY_AUTH_TOKEN or
the token file).
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raylm.builtins import is_builtin
from raylm.errors import InputError
from raylm.job import LOCAL_SOURCE_FIELDS, JobSpec
from raylm.storage import is_uri

JOB_FILE = "job.yaml"
FILES_DIR = "files"
# What a staged job may weigh: Ray's own working_dir limit is 500 MiB, and anything near it
# belongs on shared storage (a cloud URI) rather than in every submission.
MAX_STAGED_BYTES = 200 * 1024 * 1024
SKIP_DIRS = (".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", "node_modules")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class StagedJob:
    """A job packaged for the cluster: the working_dir to upload and what was put in it."""

    working_dir: str
    spec: JobSpec
    copied: list[tuple[str, str]] = field(default_factory=list)  # (local path, path in working_dir)
    notes: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _copy_source(value: str, dest_root: Path, copied: dict[str, str]) -> str:
    """Copies one local file or directory into the working_dir; returns its path there."""
    if value in copied:
        return copied[value]
    src = Path(value)
    rel = f"{FILES_DIR}/{len(copied)}-{src.name}"
    if src.is_dir():
        shutil.copytree(src, dest_root / rel, ignore=shutil.ignore_patterns(*SKIP_DIRS))
    else:
        (dest_root / FILES_DIR).mkdir(exist_ok=True)
        shutil.copy2(src, dest_root / rel)
    copied[value] = rel
    return rel


def _is_local(value: Any) -> bool:
    return (
        isinstance(value, str)
        and not is_builtin(value)
        and "://" not in value
        and os.path.isabs(value)
        and os.path.exists(value)
    )


def cluster_storage_path(storage_path: str) -> str:
    """Where a job's runs go on the cluster: URIs and absolute paths as given; a relative path
    (local to the submitting machine) under the cluster user's home, never the temporary
    working_dir that Ray deletes."""
    if is_uri(storage_path) or os.path.isabs(os.path.expanduser(storage_path)):
        return storage_path
    return "~/raylm/" + os.path.normpath(storage_path)


def stage_job(spec: JobSpec, out_dir: str | Path) -> StagedJob:
    """Writes `job.yaml` and copies of the local files it names into `out_dir`.

    Raises InputError when the copies would be too large to submit.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(mode="json")
    copied: dict[str, str] = {}
    for dotted in LOCAL_SOURCE_FIELDS:
        section, key = dotted.split(".")
        if _is_local(data[section].get(key)):
            data[section][key] = _copy_source(data[section][key], root, copied)
        if data.get("tune") and dotted in data["tune"]["search"]:
            dist = data["tune"]["search"][dotted]
            for kind, values in dist.items():
                if isinstance(values, list):
                    dist[kind] = [
                        _copy_source(v, root, copied) if _is_local(v) else v for v in values
                    ]
    notes = []
    storage = cluster_storage_path(spec.storage_path)
    if storage != spec.storage_path:
        notes.append(
            f"storage_path {spec.storage_path!r} is local to this machine; on the cluster runs "
            f"go to {storage} (use an s3:// or gs:// URI for multi-node clusters)"
        )
    data["storage_path"] = storage
    header = f"# raylm submit: job {spec.name!r} as validated on the submitting machine\n"
    (root / JOB_FILE).write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    total = _size(root)
    if total > MAX_STAGED_BYTES:
        raise InputError(
            f"the files this job names weigh {total / 2**20:.0f} MiB (limit "
            f"{MAX_STAGED_BYTES / 2**20:.0f} MiB): put them on storage every node reads "
            f"(s3://, gs://, a hub id) and name that instead"
        )
    return StagedJob(str(root), spec, [(k, v) for k, v in copied.items()], notes)


def entrypoint(run_args: Sequence[str] = ()) -> str:
    """The command the cluster runs: `raylm run job.yaml …` in the uploaded working_dir."""
    return shlex.join(["raylm", "run", JOB_FILE, *run_args])


def build_runtime_env(
    staged: StagedJob, pip: Sequence[str] = (), env_names: Sequence[str] = ()
) -> dict[str, Any]:
    """Ray's runtime_env for the job: the working_dir, pip packages by name, and env vars taken
    from this machine by name (the serving API key is carried when the job names one)."""
    names = list(env_names)
    serve = staged.spec.serve
    if serve is not None and serve.api_key_env and serve.api_key_env not in names:
        names.append(serve.api_key_env)
    env = {n: os.environ[n] for n in names if os.environ.get(n)}
    runtime_env: dict[str, Any] = {"working_dir": staged.working_dir}
    if env:
        runtime_env["env_vars"] = env
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: the argument, else RAY_ADDRESS, else the local dashboard."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


def auth_token() -> str | None:
    """Ray's auth token, found where `ray.init` finds it: RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. None when RAY_AUTH_MODE=disabled or none exists."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def jobs_client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster's Jobs API, sending Ray's auth token (if one is
    found) as the `Authorization: Bearer` header the dashboard checks."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(dashboard_address(address), headers=headers)


def submit(
    c: Any,
    staged: StagedJob,
    run_args: Sequence[str] = (),
    pip: Sequence[str] = (),
    env_names: Sequence[str] = (),
) -> str:
    """Submits the staged job through client `c`; returns its id (`raylm-<name>-<time>-<rand>`)."""
    job_id = f"raylm-{staged.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return c.submit_job(
        entrypoint=entrypoint(run_args),
        submission_id=job_id,
        runtime_env=build_runtime_env(staged, pip, env_names),
        metadata={"raylm_job": staged.spec.name},
    )


def follow(c: Any, job_id: str) -> str:
    """Prints the job's logs as they come until it ends; returns its final status name."""
    import asyncio
    import sys

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return wait(c, job_id, timeout_s=60)


def wait(c: Any, job_id: str, timeout_s: float) -> str:
    """Polls until the job is SUCCEEDED, FAILED or STOPPED (or the timeout); returns the status."""
    deadline = time.monotonic() + timeout_s
    status = str(c.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = str(c.get_job_status(job_id).value)
    return status


def list_jobs(c: Any) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first: id, status, entrypoint, start time, raylm job name."""
    rows = []
    for j in c.list_jobs():
        rows.append(
            {
                "id": j.submission_id or j.job_id,
                "status": str(j.status.value),
                "entrypoint": j.entrypoint,
                "start_time": (j.start_time or 0) / 1000,
                "job": (j.metadata or {}).get("raylm_job", ""),
                "message": j.message or "",
            }
        )
    return sorted(rows, key=lambda r: r["start_time"], reverse=True)
