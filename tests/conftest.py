"""Shared fixtures: one local Ray per test session (the `ray` tier), small job dicts."""

from __future__ import annotations

import os
from typing import Any

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with 2 CPUs, shared by every `ray` test; yields its GCS address."""
    import ray

    # With its dashboard: Ray Train frees a killed run's placement group through the State API,
    # which the dashboard serves; without it a killed run's resources leak (kill/resume tests).
    ray.init(num_cpus=2, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, with the reason, where CUDA is not available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
