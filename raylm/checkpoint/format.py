"""The checkpoint format: its layout, its metadata file, the checksums that seal it, and the
checks that refuse a damaged, half-written or pickled one. Nothing here is pickled.

Layout of one checkpoint directory:

    adapter_model.safetensors + adapter_config.json   (LoRA)
    | model.safetensors + config.json                 (full)
    tokenizer files
    raylm.json               metadata: spec, step, metrics, history, template, base model
    probe.safetensors        a fixed prompt and the model's last-position logits at this step
    train_state/
      optim.safetensors      full fp32 trainable weights + Adam moments (world-size independent)
      state.json             step, epoch position, scheduler, optimizer step count
      rng.safetensors        each worker's torch RNG state (`rank{R}`)
    checksums.json           size and sha256 of every file above; written last

Weights and moments are gathered with DeepSpeed's `safe_get_full_*` API, so the same files come
out of ZeRO 0/1/2/3 and can resume under another stage or worker count. Rank 0 writes every file,
so one `checksums.json` covers the whole checkpoint: a copy cut short (a process killed while Ray
uploads it) lacks it or fails it, and is never loaded as if it were whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from raylm.errors import CheckpointError, PathError
from raylm.job.checks import PICKLE_SUFFIXES  # a checkpoint carrying one is refused
from raylm.storage import file_sizes, is_uri, join, read_json

META_FILE = "raylm.json"
PROBE_FILE = "probe.safetensors"
STATE_DIR = "train_state"
FORMAT = "raylm-checkpoint/1"
CHECKSUMS = "checksums.json"
RNG_FILE = "rng.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory: str | Path) -> None:
    """Writes `checksums.json` (size and sha256 of every other file) last, by rename, so a
    checkpoint with a readable checksums file had all its files written first."""
    root = Path(directory)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != CHECKSUMS:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = root / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    os.replace(tmp, root / CHECKSUMS)


def checkpoint_problems(path: str | Path, hashes: bool = True) -> list[str]:
    """Why a checkpoint (local directory or URI) cannot be trusted: [] when every file has its
    recorded size and, for a local directory with `hashes`, its sha256."""
    path = str(path)
    try:
        files = read_json(join(path, CHECKSUMS))["files"]
    except FileNotFoundError:
        return [f"no {CHECKSUMS} (the checkpoint was not completely written)"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{CHECKSUMS} is unreadable ({exc})"]
    sizes = file_sizes(path)
    problems = []
    for rel, want in files.items():
        if rel not in sizes:
            problems.append(f"{rel} is missing")
        elif sizes[rel] != want["size"]:
            problems.append(f"{rel} has {sizes[rel]} bytes, {want['size']} were written")
        elif hashes and not is_uri(path) and _sha256(Path(path, rel)) != want["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def check_checkpoint(directory: str | Path) -> None:
    """Raises CheckpointError naming each problem if a raylm checkpoint or export fails its
    checksums.
    Plain HF model directories (no raylm.json) carry none and are not checked."""
    if not Path(directory, META_FILE).exists():
        return
    problems = checkpoint_problems(directory)
    if problems:
        raise CheckpointError(f"{directory} is damaged or incomplete: {'; '.join(problems)}")


_STEP = re.compile(r"^checkpoint_(\d+)")


def checkpoint_step(name: str) -> int:
    """The step in a checkpoint directory name (`checkpoint_0000040[-r1]`), -1 if none."""
    m = _STEP.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else -1


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's raylm.json (a local directory or a URI); raises FileNotFoundError if it
    is not a raylm checkpoint. The one reader of that file."""
    try:
        return read_json(join(str(directory), META_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a raylm checkpoint (no {META_FILE})") from None


def refuse_pickles(directory: str | Path) -> None:
    """Raises CheckpointError if the directory carries a pickle-format weight file."""
    bad = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if bad:
        raise CheckpointError(
            f"{directory} holds pickle-format files {bad}; raylm loads safetensors only"
        )


# What a loadable model directory holds: weights (one file or an index of shards) + a config.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def model_dir_problem(path: str | Path) -> str | None:
    """Why `path` is not a checkpoint, export or HF model directory one can load, in a few words
    (None if it is one): missing, a file, empty, half-written (raylm.json but no checksums), or
    without weights. Cheap: no file is hashed."""
    p = Path(path)
    if not p.exists():
        return "no such file or directory"
    if not p.is_dir():
        return "is a file; give a checkpoint or model directory"
    names = set(os.listdir(p))
    if not names:
        return "is an empty directory"
    if META_FILE in names and CHECKSUMS not in names:
        return f"is half-written (no {CHECKSUMS}: the checkpoint was not completely saved)"
    if not names & set(WEIGHT_FILES):
        if META_FILE not in names and "config.json" not in names:
            return "is not a checkpoint or model directory (no raylm.json or config.json)"
        return f"holds no weights (none of {', '.join(WEIGHT_FILES)})"
    return None


def require_model_dir(path: str | Path) -> None:
    """Raises PathError naming the path and what is wrong, unless `model_dir_problem` finds
    nothing."""
    problem = model_dir_problem(path)
    if problem:
        raise PathError(path, problem)
