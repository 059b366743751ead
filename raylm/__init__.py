"""raylm: fine-tune, tune and serve language models on Ray from one YAML job file.

The Python API mirrors the CLI: `load_job` → `run` (or `train` / `tune`) → `serve` / `shutdown`.
Heavy libraries load on first call, so `import raylm` stays light. No submodule shares a name
with these functions (the stages live in `raylm.training`, `raylm.tuning`, `raylm.serving`), so
they stay callable whatever else has been imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raylm.errors import GateFailed, JobSpecError, RaylmError
from raylm.job import JobSpec, load_job

if TYPE_CHECKING:
    from raylm.pipeline import RunResult
    from raylm.serving.deploy import ServePlan
    from raylm.training.trainer import TrainResult
    from raylm.tuning.sweep import SweepResult

__all__ = [
    "GateFailed",
    "JobSpec",
    "JobSpecError",
    "RaylmError",
    "load_job",
    "run",
    "serve",
    "shutdown",
    "train",
    "tune",
]
__version__ = "0.1.0"


def train(spec: JobSpec) -> TrainResult:
    """`raylm train`: trains the job on Ray (a local Ray if none is initialised)."""
    from raylm.training.trainer import run_train

    return run_train(spec)


def tune(spec: JobSpec, resume: bool = False) -> SweepResult:
    """`raylm tune`: runs (or resumes) the job's sweep and promotes the best trial."""
    from raylm.tuning.sweep import run_sweep

    return run_sweep(spec, resume=resume)


def run(spec: JobSpec, force: bool = False, serve: bool = True) -> RunResult:
    """`raylm run`: sweep or train → gate → serve the winner → answer a sample request.

    Finished stages are reused; raises GateFailed when the gate refuses the winner.
    """
    from raylm.pipeline import run_job

    return run_job(spec, force=force, serve=serve)


def serve(target: str | JobSpec) -> tuple[ServePlan, str]:
    """`raylm serve`: serves a job (file or JobSpec), checkpoint or export dir; returns
    (plan, URL)."""
    from raylm.cluster import ensure_ray
    from raylm.serving.deploy import plan_for_job, resolve_target, start

    plan = plan_for_job(target) if isinstance(target, JobSpec) else resolve_target(target)
    ensure_ray()
    return plan, start(plan)


def shutdown() -> bool:
    """`raylm shutdown`: deletes the `raylm` Serve app; returns whether one was running."""
    from raylm.serving.deploy import shutdown as stop

    return stop()
