"""Where a job's runs live under its storage path, and the records found there: the best
checkpoint a training run kept and the manifest of a sweep's promoted trial."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from raylm.checkpoint.format import checkpoint_problems, read_metadata
from raylm.storage import child_dirs, join, read_json, storage_uri

if TYPE_CHECKING:
    from raylm.job import JobSpec

MANIFEST = "manifest.json"


def run_uri(spec: JobSpec) -> str:
    """`<storage_path>/<name>` as Ray sees it: an absolute local path or a URI."""
    return join(storage_uri(spec.storage_path), spec.name)


def manifest_path(spec: JobSpec) -> str:
    """Where a sweep's promoted trial is recorded: `<storage_path>/<name>/best/manifest.json`."""
    return join(run_uri(spec), "best", MANIFEST)


def read_manifest(spec: JobSpec) -> dict[str, Any]:
    """The promoted trial of a job's sweep; raises FileNotFoundError if none was promoted."""
    return read_json(manifest_path(spec))


def best_run_checkpoint(spec: JobSpec) -> str | None:
    """The best whole checkpoint (by `checkpoint.metric`) a `raylm train` run of this job kept,
    if any; a damaged or half-written one is skipped with a warning."""
    scored = []
    for d in child_dirs(run_uri(spec), "checkpoint_"):
        problems = checkpoint_problems(d, hashes=False)  # sizes here; sha256 when it is loaded
        if problems:
            warnings.warn(f"skipping damaged checkpoint {d}: {'; '.join(problems)}", stacklevel=2)
            continue
        try:
            value = read_metadata(d).get("metrics", {}).get(spec.checkpoint.metric)
        except FileNotFoundError:
            continue
        # A preemption checkpoint is not evaluated (no metric, or NaN in older runs): never best.
        if isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((value if spec.checkpoint.mode == "min" else -value, d))
    return min(scored)[1] if scored else None
