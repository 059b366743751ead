"""raylm's model cache: where builtin and converted models are written once, as plain HF
directories that every later load reads with `from_pretrained`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where builtin models are materialised (`RAYLM_CACHE`, default ~/.cache/raylm)."""
    return Path(os.environ.get("RAYLM_CACHE", Path.home() / ".cache" / "raylm"))


def materialize(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(directory)` if it is not there yet; returns `target`.

    Concurrent workers may race here: each builds in a private temp dir and renames it into
    place; the loser discards its copy, so readers never see a half-written directory.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
