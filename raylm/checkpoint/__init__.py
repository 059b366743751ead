"""Checkpoints: the format and its checksums (`format`), the DeepSpeed train state a run resumes
from (`state`), where runs and their records live (`runs`), and loading for inference and
export (`loading`)."""

from raylm.checkpoint.format import (
    CHECKSUMS,
    META_FILE,
    PICKLE_SUFFIXES,
    check_checkpoint,
    checkpoint_problems,
    checkpoint_step,
    model_dir_problem,
    read_metadata,
    refuse_pickles,
    require_model_dir,
    seal,
)
from raylm.checkpoint.loading import (
    export_merged,
    inference_metadata,
    load_for_inference,
    load_served,
    task_of,
)
from raylm.checkpoint.runs import best_run_checkpoint, manifest_path, read_manifest, run_uri

__all__ = [
    "CHECKSUMS",
    "META_FILE",
    "PICKLE_SUFFIXES",
    "best_run_checkpoint",
    "check_checkpoint",
    "checkpoint_problems",
    "checkpoint_step",
    "export_merged",
    "inference_metadata",
    "load_for_inference",
    "load_served",
    "manifest_path",
    "model_dir_problem",
    "read_manifest",
    "read_metadata",
    "refuse_pickles",
    "require_model_dir",
    "run_uri",
    "seal",
    "task_of",
]
