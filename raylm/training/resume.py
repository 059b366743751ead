"""Where a resume starts: Ray's latest checkpoint if it is whole, else the newest whole one
before it (a damaged checkpoint is named and skipped, never loaded), and free names for the
checkpoints of re-done steps so the skipped one is never overwritten."""

from __future__ import annotations

import contextlib
from typing import Any

from raylm.checkpoint import checkpoint_problems, checkpoint_step
from raylm.storage import exists, join


def _older_checkpoints(latest: Any) -> list[Any]:
    """Ray Checkpoints beside `latest` in its run directory with a step at or below its own,
    newest first: where a resume falls back to when the latest fails its checksums."""
    import pyarrow.fs
    from ray.train import Checkpoint

    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, mine = path.rsplit("/", 1)[0], checkpoint_step(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    older = [
        i.path.rstrip("/")
        for i in infos
        if i.type == pyarrow.fs.FileType.Directory
        and 0 <= checkpoint_step(i.base_name) <= mine
        and i.path.rstrip("/") != path
    ]
    older.sort(key=lambda p: (checkpoint_step(p), p), reverse=True)
    return [Checkpoint(path=p, filesystem=fs) for p in older]


@contextlib.contextmanager
def resume_dir(latest: Any, rank: int) -> Any:
    """A local directory of the newest whole checkpoint, starting from Ray's latest, or None for a
    fresh start. A checkpoint that fails its checksums is skipped with a warning, never loaded."""
    if latest is None:
        yield None
        return
    for candidate in [latest, *_older_checkpoints(latest)]:
        with candidate.as_directory() as local:
            problems = checkpoint_problems(local)
            if not problems:
                if candidate is not latest and rank == 0:
                    print(
                        f"[raylm] WARNING: resuming from the previous good checkpoint "
                        f"{candidate.path}",
                        flush=True,
                    )
                yield local
                return
        if rank == 0:
            print(
                f"[raylm] WARNING: checkpoint {candidate.path} is damaged, not loading it: "
                f"{'; '.join(problems)}",
                flush=True,
            )
    if rank == 0:
        print("[raylm] WARNING: no whole checkpoint left; training starts over", flush=True)
    yield None


def free_name(run_dir: str, name: str) -> str:
    """`name`, or `name-1`, `name-2`… if a directory of that name is already in the run (a
    damaged checkpoint a resume skipped): Ray's checkpoint manager keys checkpoints by name."""
    taken, n, out = True, 0, name
    while taken:
        out = name if n == 0 else f"{name}-{n}"
        taken = exists(join(run_dir, out))
        n += 1
    return out
