"""JobSpec → DeepSpeed config dict. A pure function: no torch or deepspeed import needed."""

from __future__ import annotations

from typing import Any

from raylm.job import JobSpec
from raylm.job.tree import deep_merge

# Effectively "never": raylm prints its own progress, DeepSpeed's per-step prints are noise.
_QUIET_STEPS = 10**9


def warmup_steps(spec: JobSpec, total_steps: int) -> int:
    """Warm-up length in optimizer steps (at least 1: DeepSpeed's schedulers require it)."""
    return max(1, round(spec.training.warmup_ratio * total_steps))


def build_lr_schedule(spec: JobSpec, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed `scheduler` section for the job's warm-up and decay."""
    tr = spec.training
    warm = warmup_steps(spec, total_steps)
    total = max(total_steps, warm + 1)
    if tr.lr_schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": warm,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
                "warmup_type": "linear",
            },
        }
    if tr.lr_schedule == "linear":
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total,
                "warmup_num_steps": warm,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": tr.lr,
                "warmup_type": "linear",
            },
        }
    return {
        "type": "WarmupLR",
        "params": {
            "warmup_num_steps": warm,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": tr.lr,
            "warmup_type": "linear",
        },
    }


def job_global_batch(spec: JobSpec) -> int:
    """Examples per optimizer step: micro batch × grad accumulation × the most workers."""
    tr = spec.training
    return tr.micro_batch_size * tr.grad_accum * spec.scaling.max_workers


def grad_accum_at(spec: JobSpec, world_size: int, global_batch: int) -> int:
    """Micro batches each of `world_size` workers accumulates so one optimizer step stays
    `global_batch` examples; raises ValueError when that size cannot make it."""
    per_pass = spec.training.micro_batch_size * world_size
    if global_batch % per_pass:
        raise ValueError(
            f"a global batch of {global_batch} cannot be split over {world_size} worker(s) of "
            f"micro_batch_size {spec.training.micro_batch_size}"
        )
    return global_batch // per_pass


def build_optimizer(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed `optimizer` section: AdamW.

    With optimizer offload DeepSpeed uses its CPU Adam; otherwise on CPU we ask for torch's
    AdamW so no fused-Adam extension has to be compiled, and on GPU DeepSpeed's FusedAdam.
    """
    params: dict[str, Any] = {
        "lr": spec.training.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": spec.training.weight_decay,
    }
    if not spec.scaling.use_gpu and not spec.deepspeed.offload_optimizer:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def build_ds_config(
    spec: JobSpec, world_size: int, total_steps: int, global_batch: int | None = None
) -> dict[str, Any]:
    """Returns the DeepSpeed config for `spec` on `world_size` workers over `total_steps` steps.

    train_batch_size is derived from micro batch × grad accumulation × world size, so the three
    are always consistent. With `global_batch` (an elastic or resized run) grad accumulation is
    whatever keeps the step at that many examples. `deepspeed.config` from the job is merged
    over the result last.
    """
    tr, ds = spec.training, spec.deepspeed
    accum = tr.grad_accum if global_batch is None else grad_accum_at(spec, world_size, global_batch)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero["contiguous_gradients"] = True
    if ds.zero_stage >= 2:
        zero["overlap_comm"] = spec.scaling.use_gpu
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": spec.scaling.use_gpu}
    if ds.zero_stage == 3:
        # Lets save_16bit_model gather full weights; raylm gathers itself, but users expect it.
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    precision = spec.precision
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": tr.micro_batch_size * accum * world_size,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "optimizer": build_optimizer(spec),
        "scheduler": build_lr_schedule(spec, total_steps),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if ds.config:
        config = deep_merge(config, ds.config)
    return config


def warm_ops(offload: bool = True) -> list[str]:
    """Builds DeepSpeed's JIT C++ ops once (shm comm; CPU Adam for offload) into the torch
    extensions cache, so the first training run doesn't pay minutes for it. Returns their names."""
    from deepspeed.accelerator import get_accelerator

    names = ["ShareMemCommBuilder"] + (["CPUAdamBuilder"] if offload else [])
    built = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
            built.append(builder.absolute_name())
    return built
