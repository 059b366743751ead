"""Ray Train + DeepSpeed: the per-worker loop, `build_trainer(spec)` and `run_train(spec)`."""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raylm.checkpoint import run_uri
from raylm.evaluate import all_reduce_sum, evaluate, probe
from raylm.spec import JobSpec
from raylm.storage import staged_dir, storage_uri, uri_of

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """How many steps the run takes and when it evaluates."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int


def plan_steps(spec: JobSpec, n_train: int, world_size: int) -> Plan:
    """Derives the step plan; raises ValueError if the data cannot fill one optimizer step."""
    from raylm.data import steps_per_epoch

    per_epoch = steps_per_epoch(n_train, spec, world_size)
    if per_epoch < 1:
        tr = spec.training
        need = tr.micro_batch_size * tr.grad_accum * world_size
        raise ValueError(f"{n_train} training examples cannot fill one step of {need} "
                         "(micro_batch_size × grad_accum × num_workers)")
    total = spec.training.max_steps or per_epoch * spec.training.epochs
    return Plan(per_epoch, total, spec.training.eval_every or min(per_epoch, total))


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _older_checkpoints(latest: Any) -> list[Any]:
    """Ray Checkpoints beside `latest` in its run directory with a step at or below its own,
    newest first: where a resume falls back to when the latest fails its checksums."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from raylm.checkpoint import checkpoint_step

    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, mine = path.rsplit("/", 1)[0], checkpoint_step(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    older = [i.path.rstrip("/") for i in infos if i.type == pyarrow.fs.FileType.Directory
             and 0 <= checkpoint_step(i.base_name) <= mine and i.path.rstrip("/") != path]
    older.sort(key=lambda p: (checkpoint_step(p), p), reverse=True)
    return [Checkpoint(path=p, filesystem=fs) for p in older]


@contextlib.contextmanager
def _resume_dir(latest: Any, rank: int) -> Any:
    """A local directory of the newest whole checkpoint, starting from Ray's latest, or None for a
    fresh start. A checkpoint that fails its checksums is skipped with a warning, never loaded."""
    from raylm.checkpoint import checkpoint_problems

    if latest is None:
        yield None
        return
    for candidate in [latest, *_older_checkpoints(latest)]:
        with candidate.as_directory() as local:
            problems = checkpoint_problems(local)
            if not problems:
                if candidate is not latest and rank == 0:
                    print(f"[raylm] WARNING: resuming from the previous good checkpoint "
                          f"{candidate.path}", flush=True)
                yield local
                return
        if rank == 0:
            print(f"[raylm] WARNING: checkpoint {candidate.path} is damaged, not loading it: "
                  f"{'; '.join(problems)}", flush=True)
    if rank == 0:
        print("[raylm] WARNING: no whole checkpoint left; training starts over", flush=True)
    yield None


def _free_name(run_dir: str, name: str) -> str:
    """`name`, or `name-1`, `name-2`… if a directory of that name is already in the run (a
    damaged checkpoint a resume skipped): Ray's checkpoint manager keys checkpoints by name."""
    from raylm.storage import exists, join

    taken, n, out = True, 0, name
    while taken:
        out = name if n == 0 else f"{name}-{n}"
        taken = exists(join(run_dir, out))
        n += 1
    return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build, restore, train, evaluate, checkpoint, report."""
    import deepspeed
    import ray.train

    from raylm.checkpoint import (
        load_train_state,
        load_weights,
        read_metadata,
        save_checkpoint,
        save_probe,
        seal,
    )
    from raylm.data import build_datasets, collate, shard_indices
    from raylm.deepspeed import build_ds_config
    from raylm.models import build_model, build_tokenizer, resolve_model_path

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    started = time.time()
    _seed_all(spec.training.seed)
    model_path = resolve_model_path(spec.model.name_or_path)
    tok = build_tokenizer(spec, model_path)
    data = build_datasets(spec, tok)
    train, evals, labels = data.train, data.evals, data.labels
    model = build_model(spec, model_path, labels)
    plan = plan_steps(spec, len(train), world)
    step, epoch, history, resumes = 0, 0, [], []
    # One local copy of the checkpoint serves the weights (before DeepSpeed partitions them)
    # and the optimizer state (after): on cloud storage that is one download, not two.
    with _resume_dir(ray.train.get_checkpoint(), rank) as ckpt_dir:
        if ckpt_dir:
            load_weights(ckpt_dir, model)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=build_ds_config(spec, world, plan.total_steps))
        resumed = ckpt_dir is not None
        if resumed:
            state = load_train_state(ckpt_dir, engine, rank)
            meta = read_metadata(ckpt_dir)
            step, epoch = state["step"], state["epoch"]
            history, resumes = meta.get("history", []), meta.get("resumes", []) + [step]
    engine_ready = time.time()
    if resumed:
        if rank == 0 and step >= plan.total_steps:
            print(f"[raylm] {spec.name!r} already finished at step {step}; nothing to train "
                  "(use a new name= to start over)", flush=True)
        elif rank == 0:
            print(f"[raylm] resumed from checkpoint at step {step}/{plan.total_steps}", flush=True)
    else:
        _seed_all(spec.training.seed + rank)  # dropout streams differ per worker
        first = {"step": 0, "epoch": 0, **evaluate(engine, tok, evals, spec, rank, world, labels),
                 "total_steps": plan.total_steps}
        history.append(first)
        ray.train.report(first)

    micro, accum = spec.training.micro_batch_size, spec.training.grad_accum
    per_rank = plan.steps_per_epoch * accum * micro
    window_loss, window_tokens, window_steps, step_times = 0.0, 0, 0, []
    window_start = last_report = step_start = time.time()
    first_step_unix = None
    while step < plan.total_steps:
        order = shard_indices(len(train), rank, world, epoch, spec.training.seed, per_rank)
        done_in_epoch = step - epoch * plan.steps_per_epoch
        for m in range(done_in_epoch * accum, len(order) // micro):
            batch = collate([train[i] for i in order[m * micro : (m + 1) * micro]], tok.pad_token_id)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window_loss += loss.item() / accum
            window_tokens += int(batch["attention_mask"].sum())
            if (m + 1) % accum:
                continue
            step += 1
            window_steps += 1
            now = time.time()
            step_times.append(now - step_start)
            step_start = now
            first_step_unix = first_step_unix or now
            is_eval = step % plan.eval_every == 0 or step == plan.total_steps
            if step % spec.training.log_every and not is_eval:
                continue
            # Rank 0 decides whether to report, so every worker reports the same number of times.
            due = float(rank == 0 and time.time() - last_report >= spec.training.report_every_s)
            loss_sum, tokens, due = all_reduce_sum([window_loss, float(window_tokens), due])
            if not is_eval and not due:
                continue
            elapsed = time.time() - window_start
            metrics = {
                "step": step, "epoch": epoch, "total_steps": plan.total_steps,
                "loss": loss_sum / world / window_steps, "lr": engine.get_lr()[0],
                "tokens_per_s": tokens / max(elapsed, 1e-9), "step_time_s": elapsed / window_steps,
                "step_time_p50_s": statistics.median(step_times),
                "elapsed_s": time.time() - started, "first_step_unix": first_step_unix,
                "worker_start_unix": started, "engine_ready_unix": engine_ready,
            }
            window_loss, window_tokens, window_steps, step_times = 0.0, 0, 0, []
            if not is_eval:
                history.append({k: v for k, v in metrics.items() if not k.endswith("_unix")})
                ray.train.report(metrics)
                window_start = last_report = step_start = time.time()  # report time is not step time
                continue
            metrics.update(evaluate(engine, tok, evals, spec, rank, world, labels))
            history.append({k: v for k, v in metrics.items() if not k.endswith("_unix")})
            probe_ids, probe_logits = probe(engine, tok, spec, evals)
            next_epoch = epoch + 1 if step % plan.steps_per_epoch == 0 else epoch
            with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
                save_checkpoint(
                    tmp, engine=engine, tokenizer=tok, rank=rank, lora=spec.lora.enabled,
                    metadata={
                        "job": spec.name, "step": step, "metrics": metrics, "history": history,
                        "resumes": resumes,
                        "spec": spec.model_dump(mode="json"), "base_model": model_path,
                        "task": spec.model.task, "labels": labels, "data_format": spec.data.format,
                        "template": spec.data.template, "world_size": world,
                        "zero_stage": spec.deepspeed.zero_stage,
                    },
                    train_state={"step": step, "epoch": next_epoch,
                                 "global_samples": engine.global_samples})
                ckpt = None
                if rank == 0:  # rank 0 holds every file, so one checksums.json covers them all
                    save_probe(tmp, probe_ids, probe_logits)
                    seal(tmp)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt,
                                 checkpoint_dir_name=_free_name(run_uri(spec), f"checkpoint_{step:07d}"))
            window_start = last_report = step_start = time.time()  # nor is eval and checkpoint time
            if step >= plan.total_steps:
                break
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


def _progress_callback() -> Any:
    from ray.train import UserCallback

    class Progress(UserCallback):
        """Prints one line per report on the controller: step/total, loss, eval, tokens/s, ETA."""

        def __init__(self) -> None:
            self.t0: float | None = None
            self.step0 = 0

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            step, total = m.get("step", 0), m.get("total_steps", 0)
            now = time.time()
            if self.t0 is None:
                self.t0, self.step0 = now, step
            rate = (step - self.step0) / max(now - self.t0, 1e-9)
            eta = (total - step) / rate if rate > 0 else float("nan")
            parts = [f"step {step}/{total}"]
            for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("exact_match", ".3f"),
                             ("accuracy", ".3f"), ("macro_f1", ".3f"), ("entity_f1", ".3f"),
                             ("tokens_per_s", ".0f"), ("lr", ".2e")):
                if key in m:
                    parts.append(f"{key} {m[key]:{fmt}}")
            if math.isfinite(eta):
                parts.append(f"ETA {eta:.0f}s")
            if checkpoint is not None:
                parts.append("checkpoint saved")
            print("[raylm] " + " | ".join(parts), flush=True)

    return Progress()


def build_trainer(spec: JobSpec, callbacks: list[Any] | None = None) -> TorchTrainer:
    """A TorchTrainer for the job: ScalingConfig, RunConfig, CheckpointConfig, FailureConfig."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sc = spec.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    env = {} if sc.use_gpu else {"DS_ACCELERATOR": "cpu"}
    if "RAYLM_CACHE" in os.environ:
        env["RAYLM_CACHE"] = os.environ["RAYLM_CACHE"]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "env": env},
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
            placement_strategy=sc.placement_strategy),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_uri(spec.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.checkpoint.keep,
                checkpoint_score_attribute=spec.checkpoint.metric,
                checkpoint_score_order=spec.checkpoint.mode),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
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
    Returns a TrainResult; raises ray.train.TrainingFailedError if the run fails.
    """
    from raylm.cluster import check_storage, ensure_ray
    from raylm.report import write_train_report

    ensure_ray()
    check_storage(spec)
    result = build_trainer(spec).fit()
    if result.error:
        raise result.error
    latest = result.checkpoint
    best = latest
    if result.best_checkpoints:
        best = result.get_best_checkpoint(spec.checkpoint.metric, spec.checkpoint.mode) or latest
    history = _checkpoint_metadata(latest).get("history", []) if latest else []
    best_metrics = _checkpoint_metadata(best).get("metrics", {}) if best else {}
    run_dir = run_uri(spec)
    with staged_dir(run_dir) as out:
        write_train_report(out, history)
    return TrainResult(run_dir, uri_of(latest.filesystem, latest.path) if latest else None,
                       uri_of(best.filesystem, best.path) if best else None,
                       dict(result.metrics or {}), best_metrics, history)


def _checkpoint_metadata(checkpoint: Any) -> dict[str, Any]:
    """A checkpoint's raylm.json, read through its own filesystem (local disk, S3, GCS...)."""
    import json

    from raylm.checkpoint import META_FILE

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{META_FILE}") as f:
        return json.loads(f.read().decode("utf-8"))
