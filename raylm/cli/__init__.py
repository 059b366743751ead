"""`raylm` command line: a thin argparse layer over the library functions (`parser` builds it,
`stages` and `ops` hold the commands).

Exit codes come from the error's kind (`raylm.errors`): 0 success, 1 the run failed, 2 bad input
(a job file, a path, a setting; nothing started), 3 the evaluation gate refused the winner.
`key=value` overrides may come anywhere after the command, before or after flags.
Heavy libraries are imported only inside commands, so `validate` answers in well under a second.
"""

from __future__ import annotations

import sys

from raylm.cli.parser import build_parser, parse_args
from raylm.errors import InputError, RaylmError

__all__ = ["build_parser", "main", "parse_args"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `raylm` console script; returns the exit code."""
    # Progress must reach a log file or pipe as it happens, not when a buffer fills.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = parse_args(argv)
    try:
        return args.func(args)
    except RaylmError as exc:
        # A failure mid-run follows the run's own log; set it apart from it.
        lead = "" if isinstance(exc, InputError) else "\n"
        print(f"{lead}error: {exc}", file=sys.stderr)
        if exc.hint:
            print(exc.hint, file=sys.stderr)
        return exc.exit_code
