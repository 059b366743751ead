"""A job's training settings and how two of them differ: what `raylm run` compares before it
reuses a finished run."""

from __future__ import annotations

from typing import Any

from raylm.job.sections import JobSpec

NOT_TRAINING_SETTINGS = ("serve", "failure", "storage_shared")


def training_settings(spec: JobSpec) -> dict[str, Any]:
    """The job's settings that decide what training produces (as plain JSON values)."""
    return spec.model_dump(mode="json", exclude=set(NOT_TRAINING_SETTINGS))


def settings_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`path: old → new` for every leaf that differs between two settings dicts."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} → {b!r}")
    return out


# Settings renamed since a run could have recorded them: old dotted path → new.
RENAMED = {"training.max_new_tokens": "training.eval_max_new_tokens"}


def upgrade_settings(old: dict[str, Any]) -> dict[str, Any]:
    """Recorded settings with renamed fields under their current names, so a rename alone never
    reads as a change."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in old.items()}
    for before, after in RENAMED.items():
        (sec, key), (sec2, key2) = before.split("."), after.split(".")
        if isinstance(out.get(sec), dict) and key in out[sec]:
            out.setdefault(sec2, {})[key2] = out[sec].pop(key)
    return out
