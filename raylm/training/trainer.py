"""The driver side of training: `build_trainer(spec)` (a TorchTrainer over the worker recipe in
`raylm.training.loop`), live progress lines, and `run_train(spec)` with its report."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raylm.checkpoint import read_metadata, run_uri
from raylm.job import JobSpec
from raylm.storage import staged_dir, storage_uri, uri_of
from raylm.tasks import METRICS
from raylm.training.loop import train_loop_per_worker

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer


def progress_line(m: dict[str, Any], eta_s: float, saved: bool) -> str:
    """`[raylm] step 250/1000 | loss … | eval_loss … | tokens_per_s … | lr … | ETA 12s`."""
    parts = [f"step {m.get('step', 0)}/{m.get('total_steps', 0)}"]
    shown = [(k, metric.fmt) for k, metric in METRICS.items() if metric.in_progress]
    for key, fmt in [*shown, ("tokens_per_s", ".0f"), ("lr", ".2e")]:
        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
            parts.append(f"{key} {m[key]:{fmt}}")
    if math.isfinite(eta_s):
        parts.append(f"ETA {eta_s:.0f}s")
    if saved:
        parts.append(
            "preemption checkpoint saved" if m.get("preemption_checkpoint") else "checkpoint saved"
        )
    return "[raylm] " + " | ".join(parts)


def _progress_callback() -> Any:
    from ray.train import UserCallback

    class Progress(UserCallback):
        """Prints one line per report on the controller: step/total, loss, eval, tokens/s, ETA."""

        def __init__(self) -> None:
            self.t0: float | None = None
            self.step0 = 0

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            m = metrics[0] if metrics else {}
            step, total = m.get("step", 0), m.get("total_steps", 0)
            now = time.time()
            if self.t0 is None:
                self.t0, self.step0 = now, step
            rate = (step - self.step0) / max(now - self.t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else float("nan")
            print(progress_line(m, eta, checkpoint is not None), flush=True)

    return Progress()


def worker_env(spec: JobSpec) -> dict[str, str]:
    """Environment the workers set before importing anything: DeepSpeed's CPU accelerator on
    CPU workers, and the driver's builtin-model cache so every worker shares one."""
    env = {} if spec.scaling.use_gpu else {"DS_ACCELERATOR": "cpu"}
    if "RAYLM_CACHE" in os.environ:
        env["RAYLM_CACHE"] = os.environ["RAYLM_CACHE"]
    return env


def build_trainer(spec: JobSpec, callbacks: list[Any] | None = None) -> TorchTrainer:
    """A TorchTrainer for the job: ScalingConfig, RunConfig, CheckpointConfig, FailureConfig."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = spec.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "env": worker_env(spec)},
        scaling_config=ScalingConfig(
            num_workers=(sc.min_workers, sc.max_workers) if sc.elastic else sc.max_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            placement_strategy=sc.placement_strategy,
            elastic_resize_monitor_interval_s=sc.elastic_resize_monitor_interval_s,
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_uri(spec.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.checkpoint.keep,
                checkpoint_score_attribute=spec.checkpoint.metric,
                checkpoint_score_order=spec.checkpoint.mode,
            ),
            failure_config=FailureConfig(**spec.failure.model_dump()),
            callbacks=callbacks if callbacks is not None else [_progress_callback()],
        ),
    )


@dataclass
class TrainResult:
    """What a finished training run left behind."""

    run_dir: str
    checkpoint: str | None
    best_checkpoint: str | None
    metrics: dict[str, Any]
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def run_train(spec: JobSpec) -> TrainResult:
    """Trains the job on the current Ray cluster (starting a local one if none).

    Re-running a job with the same name and storage path resumes from its latest checkpoint.
    Returns a TrainResult; raises ray.train.TrainingFailedError if the run fails, StorageError
    when the job's storage cannot work on this cluster.
    """
    from raylm.cluster import check_storage, ensure_ray
    from raylm.report import write_train_report

    ensure_ray()
    check_storage(spec)
    result = build_trainer(spec).fit()
    if result.error:
        raise result.error
    latest = (
        uri_of(result.checkpoint.filesystem, result.checkpoint.path) if result.checkpoint else None
    )
    best = latest
    scored = [
        (m[spec.checkpoint.metric], c)
        for c, m in result.best_checkpoints or []
        if isinstance(m.get(spec.checkpoint.metric), (int, float))
        and math.isfinite(m[spec.checkpoint.metric])  # a preemption checkpoint: not evaluated
    ]
    if scored:
        pick = min if spec.checkpoint.mode == "min" else max
        ckpt = pick(scored, key=lambda sc: sc[0])[1]
        best = uri_of(ckpt.filesystem, ckpt.path)
    history = read_metadata(latest).get("history", []) if latest else []
    best_metrics = read_metadata(best).get("metrics", {}) if best else {}
    run_dir = run_uri(spec)
    with staged_dir(run_dir) as out:
        write_train_report(out, history)
    return TrainResult(run_dir, latest, best, dict(result.metrics or {}), best_metrics, history)
