"""`raylm run`: job → sweep (if the job has `tune.search`) or one training run → evaluation gate
(`serve.promote_if`) → the winner served on Ray Serve → one sample request answered.

A finished training/sweep stage is recorded in `<storage_path>/<name>/run.json` together with the
settings that produced it. A re-run with the same settings reuses it; a re-run of an interrupted
sweep resumes it; a changed job is refused (naming what changed) unless `force`, which moves the
old run aside rather than deleting it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from raylm.checkpoint import read_metadata, run_uri
from raylm.errors import GateFailed, NotReady, RaylmError, SettingsChanged
from raylm.job import JobSpec, settings_diff, training_settings, upgrade_settings
from raylm.serving.deploy import ServePlan
from raylm.storage import exists, join, move, read_json, write_json

__all__ = ["GateFailed", "NotReady", "RunResult", "SettingsChanged", "Winner", "run_job"]
RUN_RECORD = "run.json"


@dataclass
class Winner:
    """The checkpoint the training stage chose, with the metrics it was saved with."""

    stage: str  # "sweep" or "train"
    checkpoint: str
    metrics: dict[str, Any]
    detail: str
    reused: bool = False


@dataclass
class RunResult:
    """What `run_job` did: the winner, and where it is served (when it was)."""

    winner: Winner
    plan: ServePlan | None = None
    url: str | None = None
    answer: str | None = None
    moved_aside: str | None = None
    notes: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"[raylm run] {msg}", flush=True)


def read_record(spec: JobSpec) -> dict[str, Any] | None:
    """The finished-stage record of this job, or None."""
    try:
        return read_json(join(run_uri(spec), RUN_RECORD))
    except FileNotFoundError:
        return None


def gate_failures(promote_if: dict[str, dict[str, float]], metrics: dict[str, Any]) -> list[str]:
    """`promote_if` bounds the metrics miss, each as a readable line (empty: the gate passes)."""
    out = []
    for name, bounds in promote_if.items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            out.append(f"{name} was not reported by this run (metrics: {sorted(metrics)})")
            continue
        if "min" in bounds and value < bounds["min"]:
            out.append(f"{name}={value:.4g} is below the minimum {bounds['min']:g}")
        if "max" in bounds and value > bounds["max"]:
            out.append(f"{name}={value:.4g} is above the maximum {bounds['max']:g}")
    return out


def check_ready(spec: JobSpec, force: bool, serve: bool) -> dict[str, Any] | None:
    """Checks that need no Ray: the serving API key is set (when serving) and a finished run
    is reusable. Returns the record to reuse, if any; raises NotReady / SettingsChanged."""
    from raylm.serving.deploy import api_key_digest

    if serve and spec.serve is not None:
        api_key_digest(spec.serve)  # a missing key fails now (NotReady), not after training
    return check_reuse(spec, force)


def check_reuse(spec: JobSpec, force: bool) -> dict[str, Any] | None:
    """The record to reuse, if any. Raises SettingsChanged when the job changed (unless
    `force`)."""
    record = read_record(spec)
    if record is None or force:
        return None
    changed = settings_diff(upgrade_settings(record.get("settings", {})), training_settings(spec))
    if changed:
        raise SettingsChanged(
            f"job {spec.name!r} already finished under {run_uri(spec)} with other settings "
            f"({'; '.join(changed[:8])}{' …' if len(changed) > 8 else ''}); run with --force to "
            f"train again (the old run is moved aside, not deleted), or give the job a new name"
        )
    return record if exists(record["checkpoint"]) else None


def _move_aside(spec: JobSpec) -> str | None:
    src = run_uri(spec)
    if not exists(src):
        return None
    dst = f"{src}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    move(src, dst)
    return dst


def train_stage(
    spec: JobSpec, force: bool = False, record: dict[str, Any] | None = None
) -> tuple[Winner, str | None]:
    """Sweeps or trains, records and returns the winner — or returns `record`'s (from
    `check_reuse`) when given. Returns (winner, where an old run was moved by `force`)."""
    if record is not None:
        return Winner(
            record["stage"], record["checkpoint"], record["metrics"], record["detail"], True
        ), None
    moved = _move_aside(spec) if force else None
    if spec.tune is not None and spec.tune.search:
        from ray import tune

        from raylm.tuning.sweep import run_sweep, sweep_dir

        resume = tune.Tuner.can_restore(join(sweep_dir(spec), "tuner"))
        _say(
            ("resuming the interrupted sweep" if resume else "sweeping")
            + f" {list(spec.tune.search)}"
        )
        m = run_sweep(spec, resume=resume).manifest
        stage, ckpt = "sweep", m["checkpoint"]
        detail = f"trial {m['trial_id']} {m['config']} ({m['metric']}={m[m['metric']]:.4g})"
    else:
        from raylm.training.trainer import run_train

        _say("training")
        result = run_train(spec)
        if result.best_checkpoint is None:
            raise RaylmError(f"training {spec.name!r} finished without a checkpoint")
        stage, ckpt = "train", result.best_checkpoint
        detail = f"best checkpoint by {spec.checkpoint.metric}"
    metrics = read_metadata(ckpt).get("metrics", {})
    write_json(
        join(run_uri(spec), RUN_RECORD),
        {
            "stage": stage,
            "checkpoint": ckpt,
            "metrics": metrics,
            "detail": detail,
            "settings": training_settings(spec),
            "finished_unix": time.time(),
        },
    )
    return Winner(stage, ckpt, metrics, detail), moved


def check_gate(spec: JobSpec, winner: Winner) -> None:
    """Raises GateFailed when the winner misses `serve.promote_if`."""
    failures = gate_failures(spec.serve.promote_if if spec.serve else {}, winner.metrics)
    if failures:
        raise GateFailed(failures)


def run_job(
    spec: JobSpec,
    force: bool = False,
    serve: bool = True,
    address: str | None = None,
    persistent: bool = False,
) -> RunResult:
    """The whole pipeline; see the module docstring. Ray is the current one, else `ensure_ray`'s
    (`address`, or a local Ray — a persistent head with `persistent`).

    Raises NotReady/SettingsChanged (before any Ray work), StorageError, GateFailed, or the
    stage's own error. With `serve`, the `raylm` Serve app is left running;
    `raylm.shutdown()` stops it.
    """
    from raylm.cluster import ensure_ray
    from raylm.serving.deploy import ask, plan_for_job, start

    record = check_ready(spec, force, serve)
    ensure_ray(address, persistent=persistent)
    winner, moved = train_stage(spec, force, record)
    _say(
        f"stage 1/3 {winner.stage}: {'reused finished run' if winner.reused else 'done'} — "
        f"{winner.detail}"
    )
    check_gate(spec, winner)
    bounds = spec.serve.promote_if if spec.serve else {}
    _say(
        "stage 2/3 gate: "
        + (", ".join(f"{k}={winner.metrics[k]:.4g} ok" for k in bounds) or "none set")
    )
    result = RunResult(winner, moved_aside=moved)
    if not serve:
        return result
    result.plan = plan_for_job(spec)
    result.url = start(result.plan)
    result.answer = ask(result.plan, result.url)
    _say(f"stage 3/3 serve: {result.url}")
    return result
