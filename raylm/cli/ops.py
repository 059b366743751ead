"""The cluster and housekeeping commands: submit, jobs, shutdown, warmup, reference."""

from __future__ import annotations

import argparse
import os
from typing import Any

from raylm.cli.common import EXIT_FAILED, EXIT_OK, Failed, load
from raylm.errors import InputError


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    from raylm import submit

    spec = load(args)
    if not args.no_serve and spec.serve is not None:
        from raylm.serving.deploy import api_key_digest

        api_key_digest(spec.serve)  # its value travels in the job's runtime_env, never printed
    run_args = [
        *(["--force"] if args.force else []),
        *(["--no-serve"] if args.no_serve else []),
        "--detach",
    ]  # the job ends once its winner is served; Serve stays on the cluster
    address = submit.dashboard_address(args.address)
    with tempfile.TemporaryDirectory(prefix=f"raylm-submit-{spec.name}-") as tmp:
        staged = submit.stage_job(spec, tmp)
        for note in staged.notes:
            print(f"note: {note}")
        for local, remote in staged.copied:
            print(f"carrying {local} → {remote}")
        try:
            c = submit.jobs_client(args.address)
            job_id = submit.submit(c, staged, run_args, args.pip, args.env)
        except Exception as exc:  # connection refused, 401 without the cluster's token, ...
            raise Failed(f"could not submit to the Ray Jobs API at {address}: {exc}") from None
    print(f"submitted {job_id} to {address}: {submit.entrypoint(run_args)}")
    if args.no_wait:
        print(f"follow it with `raylm jobs logs {job_id} --address {address} --follow`")
        return EXIT_OK
    try:
        status = submit.follow(c, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (`raylm jobs stop {job_id}` stops it)")
        return EXIT_OK
    print(f"\njob {job_id}: {status}")
    return EXIT_OK if status == "SUCCEEDED" else EXIT_FAILED


def cmd_jobs(args: argparse.Namespace) -> int:
    from raylm import submit

    if args.action != "list" and not args.id:
        raise InputError(f"raylm jobs {args.action} needs a job ID (see `raylm jobs list`)")
    try:
        c = submit.jobs_client(args.address)
        _jobs_action(c, args)
    except Exception as exc:  # unknown id, unreachable cluster, missing token
        raise Failed(
            f"raylm jobs {args.action} at {submit.dashboard_address(args.address)}: {exc}"
        ) from None
    return EXIT_OK


def _jobs_action(c: Any, args: argparse.Namespace) -> None:
    import datetime

    from raylm import submit

    if args.action == "list":
        rows = submit.list_jobs(c)
        for r in rows:
            when = datetime.datetime.fromtimestamp(r["start_time"]).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{r['id']:<44} {r['status']:<10} {when}  {r['entrypoint']}")
        if not rows:
            print("no jobs")
    elif args.action == "status":
        info = c.get_job_info(args.id)
        print(f"{args.id}: {info.status.value}" + (f" — {info.message}" if info.message else ""))
    elif args.action == "logs" and args.follow:
        print(f"\n{args.id}: {submit.follow(c, args.id)}")
    elif args.action == "logs":
        print(c.get_job_logs(args.id), end="")
    elif args.action == "stop":
        c.stop_job(args.id)
        print(f"{args.id}: {submit.wait(c, args.id, timeout_s=60)}")


def cmd_shutdown(args: argparse.Namespace) -> int:
    from raylm.cluster import head_alive, recorded_head

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        address = recorded_head()
        if address is None or not head_alive(address):
            print("no raylm Serve app was running (no local Ray head is up)")
            return EXIT_OK
    import ray

    from raylm.serving.deploy import shutdown

    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise Failed(f"no Ray cluster at {address}: {exc}") from None
    stopped = shutdown()
    print("stopped the raylm Serve app" if stopped else "no raylm Serve app was running")
    return EXIT_OK


def cmd_warmup(args: argparse.Namespace) -> int:
    import time

    from raylm import builtins
    from raylm.training.ds_config import warm_ops

    t0 = time.time()
    print(
        f"built DeepSpeed ops: {', '.join(warm_ops()) or 'none needed'}  ({time.time() - t0:.0f}s)"
    )
    for model in builtins.MODELS.values():
        if model.missing_package():
            print(f"builtin model skipped: {model.name} (not installed: {model.install})")
            continue
        t0 = time.time()  # each model's own time, not the running total
        print(f"builtin model ready: {model.name} → {model.path()}  ({time.time() - t0:.0f}s)")
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    from raylm.job.reference import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK
