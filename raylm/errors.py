"""raylm's own errors, one root (`RaylmError`) and a kind per exit code, and the one formatter of
pydantic validation errors that job files and HTTP bodies share.

The CLI maps an error's `exit_code` to the process's: 2 for bad input found before any work
started (a job file, a path, a setting), 3 for a gate that refused the winner, 1 otherwise.
"""

from __future__ import annotations

import math
from typing import Any

# (dotted path as a list, the value found there, what is wrong with it)
Problem = tuple[list[str], Any, str]


class RaylmError(Exception):
    """Base of every error raylm raises on purpose; `exit_code` is what the CLI exits with and
    `hint`, when set, a line the CLI prints after the error saying what to do about it."""

    exit_code = 1
    hint: str | None = None


class InputError(RaylmError, ValueError):
    """Bad input (a job file, a path, a setting), found before any work started."""

    exit_code = 2


class JobSpecError(InputError):
    """A job file that cannot be used; `problems` lists every `path=value: message` found."""

    def __init__(self, problems: list[str], source: str = "job"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class PathError(InputError):
    """A path given on the command line that is missing or not what the command needs."""

    def __init__(self, path: Any, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class CheckpointError(InputError):
    """A checkpoint or model directory that must not be loaded (damaged, pickled weights...)."""


class StorageError(InputError):
    """The job's storage_path cannot work on the cluster it was sent to."""


class NotReady(InputError):
    """The job cannot start as given; found before any Ray work, so nothing was started."""


class SettingsChanged(NotReady):
    """A finished run of this job name was trained with other settings."""


class GateFailed(RaylmError):
    """The winner's metrics do not meet `serve.promote_if`; nothing is served."""

    exit_code = 3

    def __init__(self, failures: list[str]) -> None:
        super().__init__("the evaluation gate refused the winner: " + "; ".join(failures))
        self.failures = failures


def shown_value(value: Any, limit: int = 80) -> str:
    """`repr` of a bad value, cut to `limit` characters; NaN/inf as words (JSON has no such)."""
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The tags of the job file's tagged unions (`scaling.num_workers`: a count or a min/max range):
# pydantic puts them in an error's location, a person reads the field's own path.
UNION_TAGS = frozenset({"count", "range"})


def format_error(err: dict[str, Any], prefix: str = "", limit: int = 80) -> tuple[str, str]:
    """One pydantic error (from `ValidationError.errors()`) as (dotted path, readable line):
    `path=value: message`, `path: unknown key (value …); check the spelling` or
    `path: required field is missing`. `prefix` is put before the path (e.g. `serve.`)."""
    path = prefix + ".".join(str(p) for p in err["loc"] if p not in UNION_TAGS)
    where = path or "(top level)"
    if err["type"] == "extra_forbidden":
        return (
            path,
            f"{where}: unknown key (value {shown_value(err.get('input'), limit)}); "
            "check the spelling",
        )
    if err["type"] == "missing":
        return path, f"{where}: required field is missing"
    message = err["msg"].removeprefix("Value error, ")
    return path, f"{where}={shown_value(err.get('input'), limit)}: {message}"


def raise_problems(title: str, problems: list[Problem]) -> None:
    """Raises one pydantic ValidationError carrying every (path, value, message), if any, so a
    model validator reports all of its cross-field problems at once."""
    if not problems:
        return
    from pydantic import ValidationError
    from pydantic_core import InitErrorDetails, PydanticCustomError

    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("check", msg), loc=tuple(path), input=value)
            for path, value, msg in problems
        ],
    )
