"""JobSpec → DeepSpeed config: consistent batch sizes, stages, offload, precision; DeepSpeed
accepts it."""

from __future__ import annotations

import pytest

from raylm.job import spec_from_dict
from raylm.training.ds_config import (
    build_ds_config,
    grad_accum_at,
    job_global_batch,
    warmup_steps,
)


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


def _lr_curve(spec, total_steps: int, steps: list[int]) -> list[float]:
    """The learning rate DeepSpeed's own scheduler gives at each of `steps`."""
    import torch
    from deepspeed.runtime import lr_schedules

    from raylm.training.ds_config import build_lr_schedule

    section = build_lr_schedule(spec, total_steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.training.lr)
    scheduler = getattr(lr_schedules, section["type"])(optimizer, **section["params"])
    out = []
    for step in steps:
        scheduler.step(step)
        out.append(scheduler.get_lr()[0])
    return out


def _schedule_spec(kind: str):
    return spec_from_dict({"training": {"lr_schedule": kind, "lr": 0.01, "warmup_ratio": 0.1}})


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_schedule_warms_up_linearly_from_zero_to_the_peak(kind):
    start, half, peak = _lr_curve(_schedule_spec(kind), 100, [0, 5, 10])
    assert start == pytest.approx(0.0, abs=1e-9)
    assert half == pytest.approx(0.005, rel=0.01)  # linear, not log, warm-up
    assert peak == pytest.approx(0.01, rel=0.01)


def test_cosine_decays_to_a_tenth_of_the_peak():
    middle, end, after = _lr_curve(_schedule_spec("cosine"), 100, [55, 100, 150])
    assert middle == pytest.approx(0.0055, rel=0.05)
    assert end == pytest.approx(0.001, rel=1e-3) and after == pytest.approx(0.001, rel=1e-3)


def test_linear_decays_to_zero_at_the_last_step():
    middle, end = _lr_curve(_schedule_spec("linear"), 100, [55, 100])
    assert middle == pytest.approx(0.005, rel=1e-3)
    assert end == pytest.approx(0.0, abs=1e-9)


def test_constant_holds_the_peak_after_warm_up():
    assert _lr_curve(_schedule_spec("constant"), 100, [11, 60, 100, 1000]) == pytest.approx(
        [0.01] * 4
    )


@pytest.mark.parametrize("kind, name", [("cosine", "WarmupCosineLR"), ("linear", "WarmupDecayLR")])
def test_decaying_schedules_span_all_steps(kind, name):
    from raylm.training.ds_config import build_lr_schedule

    section = build_lr_schedule(_schedule_spec(kind), 100)
    assert section["type"] == name
    assert section["params"]["total_num_steps"] == 100
    assert section["params"]["warmup_num_steps"] == 10
    # a run shorter than its warm-up still decays over at least one step
    short = build_lr_schedule(_schedule_spec(kind), 1)["params"]
    assert (short["warmup_num_steps"], short["total_num_steps"]) == (1, 2)


def test_constant_schedule_is_warmup_lr():
    from raylm.training.ds_config import build_lr_schedule

    section = build_lr_schedule(_schedule_spec("constant"), 100)
    assert section["type"] == "WarmupLR"
    assert section["params"]["warmup_num_steps"] == 10
    assert section["params"]["warmup_max_lr"] == 0.01
    assert "total_num_steps" not in section["params"]


@pytest.mark.parametrize(
    "ratio, total, steps", [(0.1, 200, 20), (0.05, 30, 2), (0.25, 10, 2), (0.5, 7, 4), (0.0, 5, 1)]
)
def test_warmup_steps_round_and_are_at_least_one(ratio, total, steps):
    assert warmup_steps(spec_from_dict({"training": {"warmup_ratio": ratio}}), total) == steps


def test_optimizer_is_adamw_with_torchs_defaults_and_the_jobs_lr_and_decay():
    import inspect

    import torch

    from raylm.training.ds_config import build_optimizer

    spec = spec_from_dict({"training": {"lr": 0.002, "weight_decay": 0.1}})
    section = build_optimizer(spec)
    assert section["type"] == "AdamW"
    params = section["params"]
    defaults = inspect.signature(torch.optim.AdamW).parameters
    assert tuple(params["betas"]) == defaults["betas"].default
    assert params["eps"] == defaults["eps"].default
    assert params["lr"] == 0.002 and params["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "use_gpu, offload, torch_adam", [(False, False, True), (False, True, None), (True, False, None)]
)
def test_torch_adam_only_on_cpu_without_offload(use_gpu, offload, torch_adam):
    from raylm.training.ds_config import build_optimizer

    spec = spec_from_dict(
        {"scaling": {"use_gpu": use_gpu}, "deepspeed": {"offload_optimizer": offload}}
    )
    assert build_optimizer(spec)["params"].get("torch_adam") is torch_adam


@pytest.mark.parametrize(
    "stage, zero",
    [
        (0, {"stage": 0}),
        (1, {"stage": 1, "contiguous_gradients": True}),
        (2, {"stage": 2, "contiguous_gradients": True, "overlap_comm": False}),
        (
            3,
            {
                "stage": 3,
                "contiguous_gradients": True,
                "overlap_comm": False,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
        ),
    ],
)
def test_zero_section_per_stage_on_cpu(stage, zero):
    spec = spec_from_dict({"deepspeed": {"zero_stage": stage}})
    assert build_ds_config(spec, 1, 10)["zero_optimization"] == zero


def test_gpu_overlaps_communication_and_pins_offloaded_memory():
    def zero(use_gpu: bool):
        spec = spec_from_dict(
            {
                "scaling": {"use_gpu": use_gpu},
                "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
            }
        )
        return build_ds_config(spec, 1, 10)["zero_optimization"]

    gpu, cpu = zero(True), zero(False)
    assert gpu["overlap_comm"] is True and cpu["overlap_comm"] is False
    for section in ("offload_optimizer", "offload_param"):
        assert gpu[section] == {"device": "cpu", "pin_memory": True}
        assert cpu[section] == {"device": "cpu", "pin_memory": False}


def test_optimizer_offload_alone_leaves_parameters_on_the_device():
    spec = spec_from_dict({"deepspeed": {"zero_stage": 2, "offload_optimizer": True}})
    zero = build_ds_config(spec, 1, 10)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in zero


@pytest.mark.parametrize("precision, bf16, fp16", [("bf16", True, False), ("fp16", False, True)])
def test_half_precision_on_gpu(precision, bf16, fp16):
    spec = spec_from_dict({"scaling": {"use_gpu": True}, "training": {"precision": precision}})
    config = build_ds_config(spec, 1, 10)
    assert config["bf16"] == {"enabled": bf16}
    assert config["fp16"] == {"enabled": fp16, "initial_scale_power": 16}


def test_full_config_keys_and_quiet_printing():
    from raylm.training.ds_config import build_lr_schedule, build_optimizer

    spec = spec_from_dict({"training": {"micro_batch_size": 2, "grad_accum": 4}})
    config = build_ds_config(spec, 3, 50)
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 1.0
    assert config["optimizer"] == build_optimizer(spec)
    assert config["scheduler"] == build_lr_schedule(spec, 50)
    assert config["zero_allow_untested_optimizer"] is True
    assert config["wall_clock_breakdown"] is False
    assert config["steps_per_print"] >= 10**9  # DeepSpeed's own per-step prints are off
    assert set(config) == {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "zero_optimization",
        "bf16",
        "fp16",
        "optimizer",
        "scheduler",
        "zero_allow_untested_optimizer",
        "steps_per_print",
        "wall_clock_breakdown",
    }


class _Builder:
    def __init__(self, name: str, compatible: bool, loaded: list):
        self.name, self.compatible, self.loaded = name, compatible, loaded

    def is_compatible(self) -> bool:
        return self.compatible

    def load(self, verbose: bool = True) -> None:
        self.loaded.append((self.name, verbose))

    def absolute_name(self) -> str:
        return f"deepspeed.ops.{self.name}"


class _Accelerator:
    def __init__(self, builders: dict):
        self.builders, self.asked = builders, []

    def create_op_builder(self, name: str):
        self.asked.append(name)
        return self.builders.get(name)


def _fake_accelerator(monkeypatch, builders):
    import deepspeed.accelerator

    accelerator = _Accelerator(builders)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    return accelerator


def test_warm_ops_builds_shm_comm_and_cpu_adam_quietly(monkeypatch):
    from raylm.training.ds_config import warm_ops

    loaded: list = []
    accelerator = _fake_accelerator(
        monkeypatch,
        {
            "ShareMemCommBuilder": _Builder("shm", True, loaded),
            "CPUAdamBuilder": _Builder("adam", True, loaded),
        },
    )
    assert warm_ops() == ["deepspeed.ops.shm", "deepspeed.ops.adam"]
    assert accelerator.asked == ["ShareMemCommBuilder", "CPUAdamBuilder"]
    assert loaded == [("shm", False), ("adam", False)]


def test_warm_ops_without_offload_skips_cpu_adam_and_missing_or_incompatible_ops(monkeypatch):
    from raylm.training.ds_config import warm_ops

    loaded: list = []
    accelerator = _fake_accelerator(
        monkeypatch, {"ShareMemCommBuilder": _Builder("shm", False, loaded)}
    )
    assert warm_ops(offload=False) == []
    assert accelerator.asked == ["ShareMemCommBuilder"]
    assert loaded == []
    accelerator = _fake_accelerator(monkeypatch, {"CPUAdamBuilder": _Builder("adam", True, loaded)})
    assert warm_ops(offload=True) == ["deepspeed.ops.adam"]
    assert accelerator.asked == ["ShareMemCommBuilder", "CPUAdamBuilder"]


def test_fewer_workers_accumulate_more_to_keep_the_global_batch():
    spec = spec_from_dict(
        {
            "training": {"micro_batch_size": 4, "grad_accum": 3},
            "scaling": {"num_workers": {"min": 1, "max": 4}},
        }
    )
    assert job_global_batch(spec) == 48
    assert [grad_accum_at(spec, w, 48) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    with pytest.raises(ValueError, match="global batch of 32 cannot be split over 3 worker"):
        grad_accum_at(spec, 3, 32)  # a resumed run's batch that this worker count cannot make
    config = build_ds_config(spec, 2, 10, global_batch=48)
    assert config["gradient_accumulation_steps"] == 6 and config["train_batch_size"] == 48
    # Without a global batch the job's own accumulation is used, whatever the worker count.
    plain = build_ds_config(spec, 2, 10)
    assert plain["gradient_accumulation_steps"] == 3 and plain["train_batch_size"] == 24


def test_the_step_plan_is_the_same_on_any_worker_count_that_keeps_the_global_batch():
    from raylm.training.loop import plan_steps

    spec = spec_from_dict(
        {
            "training": {"micro_batch_size": 4, "grad_accum": 1, "epochs": 2, "eval_every": 5},
            "scaling": {"num_workers": {"min": 1, "max": 2}},
        }
    )
    two, one = plan_steps(spec, 100, 2), plan_steps(spec, 100, 1)
    assert (two.global_batch, two.grad_accum, one.global_batch, one.grad_accum) == (8, 1, 8, 2)
    assert (one.steps_per_epoch, one.total_steps) == (two.steps_per_epoch, two.total_steps)
    assert (two.steps_per_epoch, two.total_steps, two.eval_every) == (12, 24, 5)
    # A resumed run keeps its checkpoint's batch: 16 per step on one worker is 4 micro batches.
    kept = plan_steps(spec, 100, 1, global_batch=16)
    assert (kept.grad_accum, kept.steps_per_epoch) == (4, 6)
    with pytest.raises(ValueError, match="cannot fill one step of 8"):
        plan_steps(spec, 7, 2)
