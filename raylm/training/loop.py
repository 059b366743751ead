"""The recipe every Ray Train worker runs: setup → restore → train, where training reports
progress and, every `eval_every` steps, evaluates and writes a checkpoint through
`ray.train.report`. Each step is a named function below, in the order it runs."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from raylm.checkpoint import run_uri
from raylm.job import JobSpec
from raylm.training.evaluate import EvalContext, all_reduce_sum, evaluate, probe
from raylm.training.resume import free_name, resume_dir


@dataclass
class Plan:
    """How many steps the run takes, when it evaluates, and how each worker makes a step."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    global_batch: int
    grad_accum: int


def plan_steps(
    spec: JobSpec, n_train: int, world_size: int, global_batch: int | None = None
) -> Plan:
    """Derives the step plan for `world_size` workers making steps of `global_batch` examples
    (the job's own by default); raises ValueError if the data cannot fill one optimizer step
    or the workers cannot split the batch."""
    from raylm.data import steps_per_epoch
    from raylm.training.ds_config import grad_accum_at, job_global_batch

    batch = global_batch or job_global_batch(spec)
    accum = grad_accum_at(spec, world_size, batch)
    per_epoch = steps_per_epoch(n_train, batch)
    if per_epoch < 1:
        raise ValueError(
            f"{n_train} training examples cannot fill one step of {batch} "
            "(micro_batch_size × grad_accum × num_workers)"
        )
    total = spec.training.max_steps or per_epoch * spec.training.epochs
    return Plan(per_epoch, total, spec.training.eval_every or min(per_epoch, total), batch, accum)


@dataclass
class Worker:
    """What one worker's run is made of; built once by `setup`, never changed."""

    spec: JobSpec
    rank: int
    world: int
    tok: Any
    data: Any  # raylm.data.Datasets
    model_path: str
    plan: Plan
    started: float
    nodes: list[str] = field(default_factory=list)  # the Ray node id of each rank

    def eval_context(self, engine: Any) -> EvalContext:
        """The evaluators' view of this worker."""
        return EvalContext(
            engine, self.tok, self.data.evals, self.spec, self.rank, self.world, self.data.labels
        )


@dataclass
class Progress:
    """Where training stands: the engine and the counters a checkpoint records."""

    engine: Any
    step: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    resumed: bool = False
    engine_ready: float = 0.0
    first_step_unix: float | None = None
    preempted_at: int | None = None  # the step a preemption checkpoint was saved at
    checkpointed_at: int | None = None  # the step of the last checkpoint this attempt wrote


class Window:
    """Training loss, tokens and step times since the last report."""

    def __init__(self) -> None:
        self.clear()
        self.restart()

    def clear(self) -> None:
        self.loss, self.tokens, self.steps, self.step_times = 0.0, 0, 0, []

    def restart(self) -> None:
        """Time from here: what reporting, evaluating and checkpointing took is not step time."""
        self.start = self.step_start = time.time()

    def step_done(self) -> float:
        now = time.time()
        self.steps += 1
        self.step_times.append(now - self.step_start)
        self.step_start = now
        return now


def seed_all(seed: int) -> None:
    """Seeds Python, NumPy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: setup → restore → train (report, evaluate, checkpoint)."""
    import ray.train

    # The driver's settings for workers (DeepSpeed's accelerator, raylm's cache), before any
    # import reads them.
    os.environ.update(config.get("env", {}))
    quiet_ray_train_reports()
    worker, model = setup(config)
    # One local copy of the checkpoint serves the weights (before DeepSpeed partitions them)
    # and the optimizer state (after): on cloud storage that is one download, not two.
    with resume_dir(ray.train.get_checkpoint(), worker.rank) as ckpt_dir:
        worker = keep_global_batch(worker, ckpt_dir)
        progress = restore(worker, model, ckpt_dir)
    say_world(worker)
    begin(worker, progress)
    train(worker, progress)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` call and every checkpoint upload at INFO, each a full repr;
    raylm prints its own one-line step progress ("checkpoint saved"), so those go to WARNING."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    # Ray names the report logger by the module's file path, not its dotted name.
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup(config: dict[str, Any]) -> tuple[Worker, Any]:
    """Builds this worker's tokenizer, data shard source, model (LoRA applied) and step plan."""
    import ray.train

    from raylm.data import build_datasets
    from raylm.models import build_model, build_tokenizer, resolve_model_path

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    started = time.time()
    seed_all(spec.training.seed)
    model_path = resolve_model_path(spec.model.name_or_path)
    tok = build_tokenizer(spec, model_path)
    data = build_datasets(spec, tok)
    model = build_model(spec, model_path, data.labels)
    plan = plan_steps(spec, len(data.train), ctx.get_world_size())
    worker = Worker(
        spec,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        tok,
        data,
        model_path,
        plan,
        started,
        gather_node_ids(),
    )
    return worker, model


def gather_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective): where the run ran."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return nodes


def keep_global_batch(worker: Worker, ckpt_dir: str | None) -> Worker:
    """The worker, re-planned to the checkpoint's examples per step when the job now makes
    another (it was resumed on a different worker count): the data position and LR schedule
    continue where they were. Raises ValueError when this worker count cannot make it."""
    from raylm.checkpoint import read_metadata

    recorded = read_metadata(ckpt_dir).get("global_batch") if ckpt_dir else None
    if not recorded or recorded == worker.plan.global_batch:
        return worker
    spec = worker.spec
    try:
        plan = plan_steps(spec, len(worker.data.train), worker.world, recorded)
    except ValueError as exc:
        raise ValueError(
            f"cannot resume: the checkpoint made steps of {recorded} examples, and {exc}; "
            "resume with a worker count that divides it, or start a new run (a new name=)"
        ) from exc
    if worker.rank == 0:
        print(
            f"[raylm] keeping the checkpoint's {recorded} examples per step (the job now makes "
            f"{worker.plan.global_batch}) so the data position and LR schedule continue",
            flush=True,
        )
    return dataclasses.replace(worker, plan=plan)


def say_world(worker: Worker) -> None:
    """Says when this worker count makes its steps with another grad_accum than the job's."""
    spec, plan = worker.spec, worker.plan
    if worker.rank == 0 and plan.grad_accum != spec.training.grad_accum:
        print(
            f"[raylm] {worker.world} worker(s) (the job's most: {spec.scaling.max_workers}): "
            f"grad_accum {plan.grad_accum} keeps {plan.global_batch} examples per step",
            flush=True,
        )


def restore(worker: Worker, model: Any, ckpt_dir: str | None) -> Progress:
    """Wraps the model in a DeepSpeed engine, restoring weights, optimizer, scheduler, counters
    and RNG from `ckpt_dir` when there is one."""
    import deepspeed

    from raylm.checkpoint import read_metadata
    from raylm.checkpoint.state import load_train_state, load_weights
    from raylm.training.ds_config import build_ds_config

    if ckpt_dir:
        load_weights(ckpt_dir, model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=build_ds_config(
            worker.spec, worker.world, worker.plan.total_steps, worker.plan.global_batch
        ),
    )
    progress = Progress(engine)
    if ckpt_dir:
        state = load_train_state(ckpt_dir, engine, worker.rank)
        meta = read_metadata(ckpt_dir)
        progress.step, progress.epoch = state["step"], state["epoch"]
        progress.history = meta.get("history", [])
        progress.resumes = meta.get("resumes", []) + [state["step"]]
        progress.resumed = True
    progress.engine_ready = time.time()
    return progress


def begin(worker: Worker, progress: Progress) -> None:
    """Says where a resumed run continues, or scores the untrained model as step 0."""
    import ray.train

    total = worker.plan.total_steps
    if progress.resumed:
        if worker.rank == 0 and progress.step >= total:
            print(
                f"[raylm] {worker.spec.name!r} already finished at step {progress.step}; nothing "
                "to train (use a new name= to start over)",
                flush=True,
            )
        elif worker.rank == 0:
            print(f"[raylm] resumed from checkpoint at step {progress.step}/{total}", flush=True)
        return
    seed_all(worker.spec.training.seed + worker.rank)  # dropout streams differ per worker
    first = {
        "step": 0,
        "epoch": 0,
        **evaluate(worker.eval_context(progress.engine)),
        "total_steps": total,
    }
    progress.history.append(first)
    ray.train.report(first)


def train(worker: Worker, progress: Progress) -> None:
    """Optimizer steps over this worker's shard, epoch after epoch, from where `progress` stands;
    after each step, `report` decides whether to report, evaluate and checkpoint."""
    from raylm.data import collate, shard_indices

    spec, plan, engine = worker.spec, worker.plan, progress.engine
    micro, accum = spec.training.micro_batch_size, plan.grad_accum
    per_rank = plan.steps_per_epoch * accum * micro
    window = Window()
    while progress.step < plan.total_steps:
        order = shard_indices(
            len(worker.data.train),
            worker.rank,
            worker.world,
            progress.epoch,
            spec.training.seed,
            per_rank,
        )
        done_in_epoch = progress.step - progress.epoch * plan.steps_per_epoch
        for m in range(done_in_epoch * accum, len(order) // micro):
            rows = [worker.data.train[i] for i in order[m * micro : (m + 1) * micro]]
            batch = collate(rows, worker.tok.pad_token_id)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window.loss += loss.item() / accum
            window.tokens += int(batch["attention_mask"].sum())
            if (m + 1) % accum:
                continue
            progress.step += 1
            now = window.step_done()
            progress.first_step_unix = progress.first_step_unix or now
            report(worker, progress, window)
            save_if_preempted(worker, progress, window)
            if progress.step >= plan.total_steps:
                break
        progress.epoch += 1


def report(worker: Worker, progress: Progress, window: Window) -> None:
    """At a log point, reports progress when it is due; at an eval point, always reports, with
    eval metrics and a checkpoint. Every worker takes the same branch (the reports and the
    checkpoint gathers are collectives), so rank 0 decides whether a report is due."""
    import ray.train

    spec, plan, step = worker.spec, worker.plan, progress.step
    is_eval = step % plan.eval_every == 0 or step == plan.total_steps
    if step % spec.training.log_every and not is_eval:
        return
    due = float(worker.rank == 0 and time.time() - window.start >= spec.training.report_every_s)
    loss_sum, tokens, due = all_reduce_sum([window.loss, float(window.tokens), due])
    if not is_eval and not due:
        return
    elapsed = time.time() - window.start
    metrics = {
        "step": step,
        "epoch": progress.epoch,
        "total_steps": plan.total_steps,
        "loss": loss_sum / worker.world / window.steps,
        "lr": progress.engine.get_lr()[0],
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "step_time_s": elapsed / window.steps,
        "step_time_p50_s": statistics.median(window.step_times),
        "elapsed_s": time.time() - worker.started,
        "first_step_unix": progress.first_step_unix,
        "worker_start_unix": worker.started,
        "engine_ready_unix": progress.engine_ready,
    }
    window.clear()
    if is_eval:
        evaluate_and_checkpoint(worker, progress, metrics)
    else:
        progress.history.append(_recorded(metrics))
        ray.train.report(metrics)
    window.restart()


def _recorded(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the run's history keeps of a report (timestamps are for benches, not history)."""
    return {k: v for k, v in metrics.items() if not k.endswith("_unix")}


def evaluate_and_checkpoint(worker: Worker, progress: Progress, metrics: dict[str, Any]) -> None:
    """Adds the eval metrics to `metrics`, writes a sealed checkpoint and reports both."""
    metrics.update(evaluate(worker.eval_context(progress.engine)))
    progress.history.append(_recorded(metrics))
    write_checkpoint(worker, progress, metrics)


def write_checkpoint(worker: Worker, progress: Progress, metrics: dict[str, Any]) -> None:
    """Writes a sealed checkpoint of this step (rank 0 holds every file) and reports it to Ray
    Train with `metrics`."""
    import ray.train

    from raylm.checkpoint import seal
    from raylm.checkpoint.state import save_checkpoint, save_probe

    spec, step, ctx = worker.spec, progress.step, worker.eval_context(progress.engine)
    probe_ids, probe_logits = probe(ctx)
    ends_epoch = step % worker.plan.steps_per_epoch == 0
    with tempfile.TemporaryDirectory(prefix="raylm-ckpt-") as tmp:
        save_checkpoint(
            tmp,
            engine=progress.engine,
            tokenizer=worker.tok,
            rank=worker.rank,
            lora=spec.lora.enabled,
            metadata=checkpoint_metadata(worker, progress, metrics),
            train_state={
                "step": step,
                "epoch": progress.epoch + 1 if ends_epoch else progress.epoch,
                "global_samples": progress.engine.global_samples,
            },
        )
        ckpt = None
        if worker.rank == 0:  # rank 0 holds every file, so one checksums.json covers them all
            save_probe(tmp, probe_ids, probe_logits)
            seal(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(
            metrics,
            checkpoint=ckpt,
            checkpoint_dir_name=free_name(run_uri(spec), f"checkpoint_{step:07d}"),
        )
    progress.checkpointed_at = step


# Ray Train restarts a preempted run at the drain deadline, or this long after the notice
# when the drain names none (Ray Train's DEFAULT_PREEMPTION_DEADLINE_S).
NO_DEADLINE_WAIT_S = 120.0
# How long past the deadline the workers wait for that restart before training on (a drain
# that was cancelled, or a restart that never came).
RESTART_MARGIN_S = 60.0


def preemption_metrics(worker: Worker, progress: Progress) -> dict[str, Any]:
    """What a preemption checkpoint reports: where it is, and the ranking metric as NaN (not
    evaluated, the drain window is short), so Ray ranks it last and raylm never picks it."""
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "total_steps": worker.plan.total_steps,
        worker.spec.checkpoint.metric: float("nan"),
        "preemption_checkpoint": 1,
    }


def save_if_preempted(worker: Worker, progress: Progress, window: Window) -> None:
    """On a preemption notice for a node of this run (a drain with a deadline: a spot reclaim),
    saves a checkpoint at this step, says so, and waits for Ray Train to restart the run past
    the deadline: steps taken after it would be lost with the node, so none are taken. Every
    worker calls it after every step (ray.train.get_preemption_info is a collective)."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None or progress.preempted_at is not None:
        return
    spec, step = worker.spec, progress.step
    if step >= worker.plan.total_steps:
        return  # the run is done: it returns before the node goes, and Ray Train finishes it
    if progress.checkpointed_at != step:  # unless an eval just wrote this step's checkpoint
        write_checkpoint(worker, progress, preemption_metrics(worker, progress))
    progress.preempted_at = step
    now = time.time()
    deadline = info.deadline_ms / 1000 if info.deadline_ms else now + NO_DEADLINE_WAIT_S
    if worker.rank == 0:
        nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
        print(
            f"[raylm] node {nodes} (ranks {info.preempted_ranks}) is being preempted, deadline "
            f"in {max(deadline - now, 0):.0f}s: checkpoint saved at step {step}; waiting for "
            "Ray Train to restart the run from it",
            flush=True,
        )
    until = deadline + spec.failure.preemption_grace_s + RESTART_MARGIN_S
    while time.time() < until:
        time.sleep(0.5)
    window.clear()
    window.restart()


def checkpoint_metadata(
    worker: Worker, progress: Progress, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint's raylm.json: what produced it, how it scored, and how to prompt it."""
    spec = worker.spec
    # JSON has no NaN: a metric that was not evaluated is written as null.
    finite = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()
    }
    return {
        "job": spec.name,
        "step": progress.step,
        "metrics": finite,
        "history": progress.history,
        "resumes": progress.resumes,
        "spec": spec.model_dump(mode="json"),
        "base_model": worker.model_path,
        "task": spec.model.task,
        "labels": worker.data.labels,
        "data_format": spec.data.format,
        "template": spec.data.template,
        "world_size": worker.world,
        "global_batch": worker.plan.global_batch,
        "grad_accum": worker.plan.grad_accum,
        "nodes": worker.nodes,
        "preemption_checkpoint": "preemption_checkpoint" in metrics,
        "zero_stage": spec.deepspeed.zero_stage,
    }
