"""Reading a job: YAML, `key=value` overrides, relative paths made absolute, and validation that
reports every bad field with its dotted path and value at once."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raylm.builtins import is_builtin
from raylm.errors import JobSpecError, PathError, format_error
from raylm.job.sections import JobSpec, ServeSpec
from raylm.job.tree import deep_merge


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turns `a.b=value` strings into a nested dict (values parsed as YAML); returns
    (dict, problems)."""
    tree: dict[str, Any] = {}
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.-]*", key) or ".." in key:
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: {part} is already set to a value")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return tree, problems


def spec_from_dict(data: Any, source: str = "job") -> JobSpec:
    """Validates a plain dict as a JobSpec. Raises JobSpecError listing every problem."""
    if not isinstance(data, dict):
        raise JobSpecError(
            [f"(top level): expected a mapping of sections, got {type(data).__name__}"], source
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = [format_error(err)[1] for err in exc.errors(include_url=False)]
        raise JobSpecError(problems, source) from None


def serve_spec_from_dict(data: Any, source: str = "serve") -> ServeSpec:
    """Validates a `serve:` section alone. Raises JobSpecError listing every problem."""
    try:
        return ServeSpec.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = [format_error(err, prefix="serve.")[1] for err in exc.errors(include_url=False)]
        raise JobSpecError(problems, source) from None


# Fields that may name local files or directories; relative ones are resolved against the
# directory raylm runs in, once, so trials and workers with another cwd read the same files.
LOCAL_SOURCE_FIELDS = ("model.name_or_path", "data.train", "data.eval")


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and "://" not in value and not is_builtin(value):
        path = os.path.expanduser(value)
        if not os.path.isabs(path) and os.path.exists(path):
            return os.path.abspath(path)
    return value


def absolute_sources(data: dict[str, Any]) -> dict[str, Any]:
    """Copy of a raw job dict with existing relative local paths made absolute (searched values
    too)."""
    out = dict(data)
    for dotted in LOCAL_SOURCE_FIELDS:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: _absolute(out[section][key])}
    tune = out.get("tune")
    if isinstance(tune, dict) and isinstance(tune.get("search"), dict):
        search = dict(tune["search"])
        for dotted in LOCAL_SOURCE_FIELDS:
            dist = search.get(dotted)
            if isinstance(dist, dict):
                search[dotted] = {
                    k: [_absolute(v) for v in vs] if isinstance(vs, list) else vs
                    for k, vs in dist.items()
                }
        out["tune"] = {**tune, "search": search}
    return out


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobSpec:
    """Reads a YAML job file, applies `key=value` overrides, and validates it.

    Returns the JobSpec; raises JobSpecError naming every bad field and value, PathError when
    there is no job file at `path`.
    """
    source = str(path)
    if not Path(path).exists():
        raise PathError(path, "no such job file")
    if Path(path).is_dir():
        raise PathError(path, "is a directory; give the job's YAML file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError([f"cannot read job file: {exc}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError([f"not valid YAML: {exc}"], source) from None
    if data is None:
        raise JobSpecError(["the job file is empty"], source)
    tree, problems = parse_overrides(overrides or [])
    if problems:
        raise JobSpecError(problems, source)
    if isinstance(data, dict):
        data = absolute_sources(deep_merge(data, tree))
    return spec_from_dict(data, source)
