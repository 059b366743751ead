"""Shared fixtures: one local Ray per test session (the `ray` tier), small job dicts."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs the CLI in a fresh interpreter and prints, last, whether anything imported Ray: bad input
# must be refused before any Ray work starts.
NO_RAY_DRIVER = (
    "import sys; from raylm.cli import main; rc = main(sys.argv[1:]); "
    "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)"
)


def cli_no_ray(
    *args: str, cwd: str = REPO, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`raylm ARGS` in a subprocess; its stdout ends with NO_RAY or RAY_IMPORTED."""
    return subprocess.run(
        [sys.executable, "-c", NO_RAY_DRIVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def tiny_job(tmp_path: Any, **sections: Any) -> dict[str, Any]:
    """A job dict small enough for 2 CPU cores: tiny Llama, builtin arithmetic, short run."""
    job: dict[str, Any] = {
        "name": "t",
        "storage_path": str(tmp_path / "runs"),
        "data": {
            "train": "builtin:arithmetic",
            "template": "{instruction}=",
            "max_length": 32,
            "num_examples": 800,
        },
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "max_steps": 40,
            "eval_every": 20,
            "micro_batch_size": 8,
            "lr": 3e-3,
            "eval_max_examples": 16,
            "eval_max_new_tokens": 4,
            "report_every_s": 1.0,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


class _Rays:
    """The one Ray this test process is connected to: the 2-CPU local Ray most `ray` tests share,
    or a multi-node `ray.cluster_utils.Cluster` (tests/test_multinode_ray.py). Asking for the
    other kind shuts the current one down first, so test modules may run in any order."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.cluster: Any = None

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.kind = None

    def local(self) -> str:
        import ray

        if self.kind != "local":
            self.shutdown()
            # With its dashboard: Ray Train frees a killed run's placement group through the
            # State API, which the dashboard serves; without it a killed run's resources leak
            # (kill/resume tests). "local": a Ray of the test session's own, whatever head
            # Ray's current-cluster file names.
            ray.init(address="local", num_cpus=2, log_to_driver=True)
            self.kind = "local"
        return ray.get_runtime_context().gcs_address

    def multi_node(self, workers: int) -> Any:
        """A head with no CPUs (the driver, Train controllers and Serve's controller and proxy
        live there) and `workers` worker nodes of 1 CPU each, each its own raylet."""
        import ray
        from ray.cluster_utils import Cluster

        if self.kind != "multi":
            self.shutdown()
            self.cluster = Cluster(
                initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True}
            )
            for _ in range(workers):
                self.cluster.add_node(num_cpus=1)
            ray.init(address=self.cluster.address, log_to_driver=True)
            self.cluster.wait_for_nodes()
            self.kind = "multi"
        return self.cluster


@pytest.fixture(scope="session")
def rays():
    """The session's Ray switch (see _Rays); shuts down whatever runs at the end."""
    r = _Rays()
    yield r
    r.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(rays):
    """A real local Ray with 2 CPUs, shared by the `ray` tests; yields its GCS address."""
    return rays.local()


def endless_llama(directory: Any) -> str:
    """A copy of the builtin tiny Llama whose end-of-text token is one it never generates
    (`<|system|>`): every answer runs to its token limit, so limits and finish reasons can be
    asserted exactly. Returns its path."""
    import json
    import shutil

    from raylm.models import materialize_tiny_llama

    target = os.path.join(str(directory), "endless-llama")
    if os.path.exists(target):
        return target
    shutil.copytree(materialize_tiny_llama(), target)
    stop = "<|system|>"
    with open(os.path.join(target, "tokenizer.json")) as f:
        stop_id = next(t["id"] for t in json.load(f)["added_tokens"] if t["content"] == stop)
    for name, key, value in (
        ("tokenizer_config.json", "eos_token", stop),
        ("config.json", "eos_token_id", stop_id),
        ("generation_config.json", "eos_token_id", stop_id),
    ):
        path = os.path.join(target, name)
        with open(path) as f:
            data = json.load(f)
        data[key] = value
        with open(path, "w") as f:
            json.dump(data, f)
    return target


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU, whatever the installed torch can use."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return out.returncode == 0 and "GPU" in out.stdout


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, with the reason, on machines without a GPU. On a machine with one they
    run, and fail (naming the install command) if the installed torch cannot use it."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda or gpu_visible():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def prometheus_text() -> str:
    """What this node's Ray metrics endpoint (Prometheus format) says now."""
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of metric `name` (a counter's `_total` too) carrying `labels`."""
    import re

    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:_total)?{{([^}}]*)}} (\S+)$", text, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(tags.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_for_metric(name: str, want: float, timeout_s: float = 60.0, **labels: str) -> float:
    """Polls Ray's metrics until `name` reaches `want` (metrics are exported every few seconds);
    returns the last value seen."""
    import time

    deadline, value = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        value = metric_total(prometheus_text(), name, **labels)
        if value >= want:
            break
        time.sleep(1)
    return value
