"""Ray Tune sweeps: a param space from the job's `tune.search`, trials that each run the job's own
TorchTrainer, ASHA early stopping, the best trial promoted to a manifest, and a sweep report.

Layout under `<storage_path>/<name>/`:

    sweep/tuner/              Ray Tune's experiment (what `--resume` restores)
    sweep/trials/trial-<id>/  each trial's Ray Train run and checkpoints
    sweep/results.csv|json    one row per trial, ranked
    sweep/heatmap.png, sweep/curves.png
    best/manifest.json        the promoted trial: config, metrics, checkpoint path, top-k
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

from raylm.checkpoint import manifest_path, read_manifest, run_uri
from raylm.errors import InputError, NotReady, RaylmError
from raylm.job import JobSpec
from raylm.job.tree import deep_merge, nest
from raylm.storage import exists, join, staged_dir, uri_of, write_json
from raylm.training.trainer import build_trainer
from raylm.tuning.progress import sweep_progress

__all__ = ["manifest_path", "read_manifest", "run_sweep", "sweep_dir"]
# A trial only drives its Train run (the workers hold the real resources), but Tune will not
# schedule a trial that asks for nothing: a token CPU slice.
TRIAL_DRIVER_CPUS = 0.01


def sweep_dir(spec: JobSpec) -> str:
    """`<storage_path>/<name>/sweep` (absolute)."""
    return join(run_uri(spec), "sweep")


def build_param_space(spec: JobSpec) -> dict[str, Any]:
    """Tune's param space: one entry per searched dotted field."""
    from ray import tune

    makers = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    assert spec.tune is not None
    return {
        path: makers[kind](arg)
        for path, dist in spec.tune.search.items()
        for kind, arg in dist.items()
    }


def trial_spec(
    job: dict[str, Any], config: dict[str, Any], trial_id: str, trials_dir: str
) -> JobSpec:
    """The job with a trial's sampled values applied, run under its own name in the sweep."""
    data = {k: v for k, v in job.items() if k != "tune"}
    for path, value in config.items():
        data = deep_merge(data, nest(path.split("."), value))
    data.update(name=f"trial-{trial_id}", storage_path=trials_dir)
    return JobSpec.model_validate(data)


def _eval_reports_to_tune(metric: str) -> Any:
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportsToTune(TuneReportCallback):
        """Forwards only reports that carry the sweep metric: ASHA compares trials on evals,
        and a progress report without the metric would stop the scheduler. A preemption
        checkpoint carries it as NaN (not evaluated) and is not forwarded either."""

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            value = metrics[0].get(metric) if metrics else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportsToTune()


def run_trial(config: dict[str, Any], job: dict[str, Any], trials_dir: str) -> None:
    """A Tune trial: the job's TorchTrainer with this trial's values; reports flow to Tune."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(job, config, trial_id, trials_dir)
    assert spec.tune is None
    metric = job["tune"]["metric"]
    result = build_trainer(spec, callbacks=[_eval_reports_to_tune(metric)]).fit()
    if result.error:
        raise result.error


def default_concurrency(spec: JobSpec) -> int:
    """How many trials the cluster can run at once (each needs all its workers' resources)."""
    import ray

    sc = spec.scaling
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) // (sc.max_workers * sc.cpus_per_worker + TRIAL_DRIVER_CPUS)]
    if sc.use_gpu:
        fits.append(total.get("GPU", 0) // (sc.max_workers * sc.gpus_per_worker))
    return max(1, int(min(fits)))


def trial_retries(spec: JobSpec) -> int:
    """Times Tune retries a trial that failed: the job's max_failures, at least 1 — a trial
    driver lost with its node is a node failure, and the retry resumes from a checkpoint."""
    n = spec.failure.max_failures
    return -1 if n == -1 else max(n, 1)


def build_trial_scheduler(spec: JobSpec) -> Any:
    """ASHA over optimizer steps, or None."""
    assert spec.tune is not None
    if spec.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    tu = spec.tune
    grace = tu.grace_period or spec.training.eval_every or 1
    return ASHAScheduler(
        time_attr="step",
        max_t=spec.training.max_steps or 10**9,
        grace_period=grace,
        reduction_factor=tu.reduction_factor,
    )


def build_search_alg(spec: JobSpec) -> Any:
    """Tune's default random/grid generator, or Optuna (an optional extra)."""
    assert spec.tune is not None
    if spec.tune.search_alg == "random":
        return None
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:
        raise InputError(
            "tune.search_alg: optuna needs the optuna package: "
            "pip install 'raylm[optuna]' (or pip install optuna)"
        ) from exc
    return OptunaSearch()


def build_tuner(spec: JobSpec, resume: bool = False) -> Any:
    """A Tuner for the job's sweep, or the restored one when `resume` is set.

    Raises NotReady when asked to resume a sweep that was never started.
    """
    from ray import tune

    assert spec.tune is not None
    root = sweep_dir(spec)
    job = spec.model_dump(mode="json")
    trainable = tune.with_parameters(run_trial, job=job, trials_dir=join(root, "trials"))
    trainable = tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
    tuner_path = join(root, "tuner")
    if resume:
        if not tune.Tuner.can_restore(tuner_path):
            raise NotReady(f"no sweep to resume at {tuner_path}; run `raylm tune` first")
        return tune.Tuner.restore(
            tuner_path,
            trainable=trainable,
            param_space=build_param_space(spec),
            resume_unfinished=True,
            resume_errored=True,
        )
    tu = spec.tune
    return tune.Tuner(
        trainable,
        param_space=build_param_space(spec),
        tune_config=tune.TuneConfig(
            metric=tu.metric,
            mode=tu.mode,
            num_samples=tu.num_samples,
            max_concurrent_trials=tu.max_concurrent_trials or default_concurrency(spec),
            scheduler=build_trial_scheduler(spec),
            search_alg=build_search_alg(spec),
        ),
        run_config=tune.RunConfig(
            name="tuner",
            storage_path=root,
            callbacks=[sweep_progress(spec)],
            verbose=0,
            # A trial whose driver went down with its node is retried; its trainer resumes from
            # the trial's last checkpoint, so only the progress since then is lost.
            failure_config=tune.FailureConfig(max_failures=trial_retries(spec)),
        ),
    )


@dataclass
class SweepResult:
    """A finished sweep: ranked trial rows, the manifest and the report files."""

    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    files: dict[str, str]


def trial_rows(results: Any, spec: JobSpec) -> list[dict[str, Any]]:
    """One row per trial, best first: its values, best metric and checkpoint, steps, status."""
    tu = spec.tune
    assert tu is not None
    sign = 1 if tu.mode == "min" else -1
    rows = []
    for r in results:
        df = r.metrics_dataframe
        row: dict[str, Any] = {
            "trial_id": (r.metrics or {}).get("trial_id") or os.path.basename(r.path or "?")
        }
        row.update({path: r.config.get(path) for path in tu.search})
        evals = df[df[tu.metric].notna()] if df is not None and tu.metric in df else None
        if evals is None or evals.empty:
            row.update({tu.metric: None, "step": 0, "checkpoint": None, "status": "error"})
            rows.append(row)
            continue
        with_ckpt = evals.iloc[0:0]
        if "checkpoint_path" in evals:
            # Reports name every checkpoint ever saved; Ray keeps only `checkpoint.keep` of them
            # (on a tie it may keep a later one), so only those still on storage can be promoted.
            kept = [
                isinstance(p, str) and exists(uri_of(r.filesystem, p))
                for p in evals["checkpoint_path"]
            ]
            with_ckpt = evals[kept]
        pool = with_ckpt if not with_ckpt.empty else evals
        # By position: a resumed trial's dataframe can repeat index labels.
        best = pool.iloc[int((pool[tu.metric] * sign).to_numpy().argmin())]
        last = evals.iloc[-1]
        status = (
            "error"
            if r.error
            else ("finished" if last["step"] >= last["total_steps"] else "stopped early")
        )
        row.update(
            {
                tu.metric: float(best[tu.metric]),
                "best_step": int(best["step"]),
                "step": int(last["step"]),
                "total_steps": int(last["total_steps"]),
                "checkpoint": uri_of(r.filesystem, best["checkpoint_path"])
                if not with_ckpt.empty
                else None,
                "status": status,
                "curve": [
                    [int(s), float(v)] for s, v in zip(evals["step"], evals[tu.metric], strict=True)
                ],
            }
        )
        rows.append(row)
    ranked = [r for r in rows if r.get(tu.metric) is not None]
    ranked.sort(key=lambda r: sign * r[tu.metric])
    return ranked + [r for r in rows if r.get(tu.metric) is None]


def promote(spec: JobSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Writes `best/manifest.json` for the best trial with a checkpoint; returns the manifest.

    Raises RaylmError if no trial produced a checkpoint.
    """
    tu = spec.tune
    assert tu is not None
    candidates = [r for r in rows if r.get("checkpoint")]
    if not candidates:
        raise RaylmError("no trial finished an eval with a checkpoint; nothing to promote")

    def entry(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "trial_id": r["trial_id"],
            "config": {p: r[p] for p in tu.search},
            tu.metric: r[tu.metric],
            "step": r["best_step"],
            "checkpoint": r["checkpoint"],
        }

    best = candidates[0]
    manifest = {
        "job": spec.name,
        "metric": tu.metric,
        "mode": tu.mode,
        **entry(best),
        "top_k": [entry(r) for r in candidates[: tu.top_k]],
        "created_unix": time.time(),
    }
    write_json(manifest_path(spec), manifest)  # readers never see a half-written manifest
    return manifest


def run_sweep(spec: JobSpec, resume: bool = False) -> SweepResult:
    """Runs (or resumes) the job's sweep, promotes the best trial and writes the report.

    Returns the SweepResult; raises InputError if the job has no `tune.search`.
    """
    from raylm.cluster import check_storage, ensure_ray
    from raylm.report import write_sweep_report

    if spec.tune is None or not spec.tune.search:
        raise InputError(f"{spec.name}: the job has no tune.search to sweep; nothing to sweep")
    ensure_ray()
    check_storage(spec)
    results = build_tuner(spec, resume=resume).fit()
    rows = trial_rows(results, spec)
    manifest = promote(spec, rows)
    with staged_dir(sweep_dir(spec)) as out:
        files = write_sweep_report(out, rows, spec.tune.metric, list(spec.tune.search))
    files = {k: join(sweep_dir(spec), os.path.basename(v)) for k, v in files.items()}
    return SweepResult(rows, manifest, files)
