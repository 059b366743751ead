"""What every command shares: exit codes, the failure kind, job loading."""

from __future__ import annotations

import argparse

from raylm.errors import RaylmError
from raylm.job import JobSpec, load_job

EXIT_OK, EXIT_FAILED = 0, 1


class Failed(RaylmError):
    """A command's work failed; the message says which work and why."""


def fail(what: str, exc: Exception) -> Failed:
    return Failed(f"{what} failed: {exc}")


def load(args: argparse.Namespace) -> JobSpec:
    return load_job(args.job, args.overrides)
