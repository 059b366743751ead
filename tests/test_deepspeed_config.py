"""JobSpec → DeepSpeed config: consistent batch sizes, stages, offload, precision; DeepSpeed
accepts it."""

from __future__ import annotations

import pytest

from raylm.job import spec_from_dict
from raylm.training.ds_config import build_ds_config, warmup_steps


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage_is_accepted_by_deepspeed(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = spec_from_dict({"deepspeed": {"zero_stage": stage}})
    config = build_ds_config(spec, world_size=1, total_steps=100)
    parsed = DeepSpeedConfig(config, mpu=None)  # DeepSpeed's own parser and batch assertion
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 8


def test_batch_sizes_are_consistent_with_world_size():
    spec = spec_from_dict({"training": {"micro_batch_size": 4, "grad_accum": 3}})
    config = build_ds_config(spec, world_size=8, total_steps=10)
    assert config["train_batch_size"] == 4 * 3 * 8
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3


def test_offload_and_precision():
    cpu = build_ds_config(
        spec_from_dict(
            {"deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}}
        ),
        2,
        10,
    )
    zero = cpu["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in cpu["optimizer"]["params"]  # offload uses DeepSpeed's CPU Adam
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    gpu = build_ds_config(spec_from_dict({"scaling": {"use_gpu": True}}), 8, 10)
    assert gpu["bf16"]["enabled"] is True
    plain = build_ds_config(spec_from_dict({}), 2, 10)
    assert plain["optimizer"]["params"]["torch_adam"] is True  # no JIT-compiled Adam on CPU


def test_schedule_and_clipping():
    spec = spec_from_dict(
        {
            "training": {
                "warmup_ratio": 0.1,
                "lr_schedule": "linear",
                "lr": 0.01,
                "max_grad_norm": 0.5,
            }
        }
    )
    config = build_ds_config(spec, 2, 200)
    assert config["scheduler"]["type"] == "WarmupDecayLR"
    assert config["scheduler"]["params"]["warmup_num_steps"] == warmup_steps(spec, 200) == 20
    assert config["scheduler"]["params"]["warmup_max_lr"] == 0.01
    assert config["gradient_clipping"] == 0.5
    assert warmup_steps(spec_from_dict({"training": {"warmup_ratio": 0.0}}), 5) == 1


def test_raw_config_is_merged_last():
    spec = spec_from_dict(
        {
            "deepspeed": {
                "config": {
                    "zero_optimization": {"reduce_bucket_size": 123},
                    "wall_clock_breakdown": True,
                }
            }
        }
    )
    config = build_ds_config(spec, 2, 10)
    assert config["zero_optimization"]["reduce_bucket_size"] == 123
    assert config["zero_optimization"]["stage"] == 2  # siblings survive the merge
    assert config["wall_clock_breakdown"] is True


def test_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, raylm.training.ds_config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"
