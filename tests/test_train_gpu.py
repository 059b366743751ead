"""GPU path: bf16 ZeRO-2 LoRA on CUDA workers. Skipped without a GPU (see conftest)."""

from __future__ import annotations

import pytest

from raylm.job import spec_from_dict
from raylm.training.trainer import run_train

from .conftest import tiny_job

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def test_bf16_zero2_lora_on_gpu(tmp_path):
    import ray
    import torch

    assert torch.cuda.is_available(), (
        f"a GPU is visible (nvidia-smi) but torch {torch.__version__} cannot use it: install a "
        "CUDA build of torch, e.g. `make install TORCH=torch` (the Makefile pins the CPU wheel)"
    )
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=torch.cuda.device_count())
    job = tiny_job(
        tmp_path,
        name="gpu",
        scaling={"num_workers": 1, "use_gpu": True},
        deepspeed={"zero_stage": 2},
    )
    spec = spec_from_dict(job)
    assert spec.precision == "bf16"
    result = run_train(spec)
    first, last = result.history[0], result.history[-1]
    assert last["eval_loss"] < 0.7 * first["eval_loss"]
