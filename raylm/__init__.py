"""raylm: fine-tune, tune and serve language models on Ray from one YAML job file."""

from raylm.spec import JobSpec, JobSpecError, load_job

__all__ = ["JobSpec", "JobSpecError", "load_job", "train", "tune"]
__version__ = "0.1.0"


def train(spec: JobSpec):  # noqa: ANN201 - lazy import keeps `import raylm` light
    """Runs `raylm.train.run_train(spec)`; returns its TrainResult."""
    from raylm.train import run_train

    return run_train(spec)


def tune(spec: JobSpec, resume: bool = False):  # noqa: ANN201
    """Runs `raylm.tune.run_sweep(spec, resume)`; returns its SweepResult."""
    from raylm.tune import run_sweep

    return run_sweep(spec, resume=resume)
