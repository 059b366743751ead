"""raylm: fine-tune, tune and serve language models on Ray from one YAML job file.

The Python API mirrors the CLI: `load_job` → `run` (or `train` / `tune`) → `serve` / `shutdown`.
Heavy libraries load on first call, so `import raylm` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raylm.spec import JobSpec, JobSpecError, load_job

if TYPE_CHECKING:
    from raylm.pipeline import RunResult
    from raylm.serve import ServePlan
    from raylm.train import TrainResult
    from raylm.tune import SweepResult

__all__ = ["JobSpec", "JobSpecError", "load_job", "run", "serve", "shutdown", "train", "tune"]
__version__ = "0.1.0"


def train(spec: JobSpec) -> TrainResult:
    """`raylm train`: trains the job on Ray (a local Ray if none is initialised)."""
    from raylm.train import run_train

    return run_train(spec)


def tune(spec: JobSpec, resume: bool = False) -> SweepResult:
    """`raylm tune`: runs (or resumes) the job's sweep and promotes the best trial."""
    from raylm.tune import run_sweep

    return run_sweep(spec, resume=resume)


def run(spec: JobSpec, force: bool = False, serve: bool = True) -> RunResult:
    """`raylm run`: sweep or train → gate → serve the winner → answer a sample request.

    Finished stages are reused; raises raylm.pipeline.GateFailed when the gate refuses the winner.
    """
    from raylm.pipeline import run_job

    return run_job(spec, force=force, serve=serve)


def serve(target: str | JobSpec) -> tuple[ServePlan, str]:
    """`raylm serve`: serves a job (file or JobSpec), checkpoint or export dir; returns (plan, URL)."""
    from raylm.cluster import ensure_ray
    from raylm.serve import plan_for_job, resolve_target, start

    plan = plan_for_job(target) if isinstance(target, JobSpec) else resolve_target(target)
    ensure_ray()
    return plan, start(plan)


def shutdown() -> bool:
    """`raylm shutdown`: deletes the `raylm` Serve app; returns whether one was running."""
    from raylm.serve import shutdown as stop

    return stop()
