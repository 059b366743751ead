"""The `raylm` argument parser: one sub-command per function in `raylm.cli.stages` and
`raylm.cli.ops`; `key=value` overrides may come anywhere after the command."""

from __future__ import annotations

import argparse
from typing import Any

from raylm.cli import ops, stages

DESCRIPTION = "Fine-tune, tune and serve language models on Ray from one YAML job file."

ADDRESS_HELP = (
    "Ray cluster to attach to (default: RAY_ADDRESS, else a running local head, "
    "else a new local Ray)"
)


def _job_command(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("job", help="YAML job file")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted.key=value overrides, e.g. training.lr=1e-4 (anywhere after the command)",
    )
    return p


def _add_stage_commands(sub: Any) -> None:
    p = _job_command(
        sub, "validate", "check a job file; exit 0 if valid, 2 with every problem if not"
    )
    p.set_defaults(func=stages.cmd_validate)
    p = _job_command(
        sub, "train", "fine-tune with Ray Train + DeepSpeed (re-running a job resumes it)"
    )
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=stages.cmd_train)
    p = _job_command(
        sub, "tune", "sweep the job's tune.search with Ray Tune (ASHA) and promote the best trial"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=stages.cmd_tune)
    p = _job_command(
        sub,
        "run",
        "the whole pipeline: sweep or train → gate (serve.promote_if) → serve the "
        "winner → answer a sample request; finished stages are reused on a re-run",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="train again even if this job finished (the old run is moved aside)",
    )
    p.add_argument("--no-serve", action="store_true", help="stop after the gate")
    p.add_argument(
        "--detach",
        action="store_true",
        help="leave the winner served on the Ray cluster and exit (starts a local Ray head "
        "if none)",
    )
    p.add_argument(
        "--serve-for",
        type=float,
        default=None,
        metavar="SECONDS",
        help="serve this long, then stop (0: answer the sample request and stop); "
        "default: until Ctrl-C",
    )
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=stages.cmd_run)


def _add_cluster_commands(sub: Any) -> None:
    p = _job_command(
        sub,
        "submit",
        "send the job to a Ray cluster's Jobs API as `raylm run` (data it "
        "names travels with it) and follow its logs",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Jobs API / dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS, "
        "else http://127.0.0.1:8265)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="submit and return without following the logs"
    )
    p.add_argument("--force", action="store_true", help="passed to `raylm run` on the cluster")
    p.add_argument("--no-serve", action="store_true", help="passed to `raylm run` on the cluster")
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="pip requirement for the job's runtime_env, by name; repeatable",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="environment variable to carry from here (value never printed); repeatable",
    )
    p.set_defaults(func=ops.cmd_submit)
    p = sub.add_parser("jobs", help="Ray Jobs on a cluster: list | status ID | logs ID | stop ID")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (from `raylm submit` or `raylm jobs list`)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    p.add_argument(
        "--address",
        default=None,
        help="Jobs API address (default: RAY_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.set_defaults(func=ops.cmd_jobs)


def _add_model_commands(sub: Any) -> None:
    p = sub.add_parser("export", help="merge a LoRA checkpoint into a plain HF model directory")
    p.add_argument("checkpoint", help="a raylm checkpoint directory")
    p.add_argument("out_dir", help="new directory for the merged model")
    p.set_defaults(func=stages.cmd_export)
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint, an export, or a job's winner over an "
        "OpenAI-compatible HTTP API on Ray Serve",
    )
    p.add_argument(
        "target",
        help="job file (its promoted sweep winner or best training checkpoint), "
        "checkpoint dir, or exported model dir",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="serve.key=value overrides, e.g. serve.port=8001 (anywhere after the command)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve this LoRA checkpoint (same base) as model NAME; repeatable",
    )
    p.add_argument("--name", default=None, help="model name of TARGET (default: its job name)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="leave it running on the Ray cluster (starts a local Ray head if none)",
    )
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=stages.cmd_serve)
    p = sub.add_parser("shutdown", help="stop the raylm Serve app on a Ray cluster")
    p.add_argument(
        "--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local head)"
    )
    p.set_defaults(func=ops.cmd_shutdown)
    sub.add_parser("reference", help="print the job-file reference (Markdown)").set_defaults(
        func=ops.cmd_reference
    )
    sub.add_parser(
        "warmup", help="prebuild DeepSpeed's JIT ops and the builtin model on this machine"
    ).set_defaults(func=ops.cmd_warmup)


def build_parser() -> argparse.ArgumentParser:
    """The `raylm` argument parser."""
    parser = argparse.ArgumentParser(prog="raylm", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_stage_commands(sub)
    _add_cluster_commands(sub)
    _add_model_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses a command line; `key=value` words after a flag join the command's overrides (as
    git, ray and torchrun users expect), anything else unknown is an error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [
        e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
