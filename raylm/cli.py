"""`raylm` command line: a thin argparse layer over the library functions.

Exit codes: 0 success, 1 the run failed, 2 the job file (or the command line) is bad, 3 the
evaluation gate (`serve.promote_if`) refused the winner.
Heavy libraries are imported only inside commands, so `validate` answers in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from raylm.spec import JobSpec, JobSpecError, load_job, reference_markdown

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_GATE = 0, 1, 2, 3


def _load(args: argparse.Namespace) -> JobSpec | None:
    try:
        return load_job(args.job, args.overrides)
    except JobSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    keys = ("step", "loss", "eval_loss", "perplexity", "exact_match", "accuracy", "macro_f1",
            "entity_precision", "entity_recall", "entity_f1")
    return ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
        for k in keys if k in metrics
    )


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    if spec is None:
        return EXIT_BAD_INPUT
    tr, sc, ds = spec.training, spec.scaling, spec.deepspeed
    print(f"ok: {args.job} → job {spec.name!r}: {spec.model.name_or_path} ({spec.model.task}), "
          f"{'LoRA r=' + str(spec.lora.r) if spec.lora.enabled else 'full fine-tuning'}, "
          f"ZeRO-{ds.zero_stage}, {sc.num_workers} worker(s){' on GPU' if sc.use_gpu else ''}, "
          f"global batch {tr.micro_batch_size * tr.grad_accum * sc.num_workers}, {spec.precision}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    spec = _load(args)
    if spec is None:
        return EXIT_BAD_INPUT
    from raylm.cluster import StorageError, ensure_ray
    from raylm.train import run_train

    ensure_ray(args.address)
    try:
        result = run_train(spec)
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # the run's own traceback is already in the log above
        print(f"\nerror: training {spec.name!r} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n=== raylm train: done ===")
    print(f"run dir:          {result.run_dir}")
    print(f"best checkpoint:  {result.best_checkpoint}  ({_fmt_metrics(result.best_metrics)})")
    print(f"last checkpoint:  {result.checkpoint}")
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"eval:             {_fmt_metrics(first)}  →  {_fmt_metrics(last)}")
        print(f"report:           {result.run_dir}/metrics.jsonl, {result.run_dir}/loss_curve.png")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    spec = _load(args)
    if spec is None:
        return EXIT_BAD_INPUT
    if spec.tune is None or not spec.tune.search:
        print(f"error: {args.job}: tune.search is empty; nothing to sweep", file=sys.stderr)
        return EXIT_BAD_INPUT
    from raylm.cluster import StorageError, ensure_ray
    from raylm.report import format_sweep_table
    from raylm.tune import run_sweep, sweep_dir

    ensure_ray(args.address)
    try:
        result = run_sweep(spec, resume=args.resume)
    except (FileNotFoundError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        print(f"\nerror: sweep {spec.name!r} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    m = result.manifest
    print("\n=== raylm tune: done ===")
    print(format_sweep_table(result.rows, spec.tune.metric, list(spec.tune.search)))
    print(f"\npromoted: trial {m['trial_id']} {m['config']}  {m['metric']}={m[m['metric']]:.4g}")
    print(f"checkpoint: {m['checkpoint']}")
    print(f"report:     {sweep_dir(spec)}/results.csv, results.json, heatmap.png, curves.png")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from raylm.checkpoint import export_merged, task_of
    from raylm.models import AUTO_CLASSES

    try:
        out = export_merged(args.checkpoint, args.out_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"exported {args.checkpoint} → {out} (load with {AUTO_CLASSES[task_of(out)]}.from_pretrained)")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from raylm.serve import resolve_target

    try:
        plan = resolve_target(args.target, args.overrides, args.adapter, args.name)
    except (FileNotFoundError, ValueError) as exc:  # JobSpecError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from raylm.cluster import ensure_ray
    from raylm.serve import api_key_digest, start

    try:
        api_key_digest(plan.spec)  # refuse before starting anything
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ensure_ray(args.address, persistent=args.detach)
    try:
        url = start(plan)
    except Exception as exc:
        print(f"\nerror: serving {args.target} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n=== raylm serve: up ===")
    for note in plan.notes:
        print(f"serving          {note}")
    _print_served(plan, url)
    return _keep_serving(args.detach, None)


def _print_served(plan: Any, url: str) -> None:
    from raylm.serve import curl_line

    print(f"models:          {', '.join(n for n, _ in plan.models)}")
    print(f"url:             {url}/v1  (OpenAI-compatible; health: {url}/health)")
    print(f"try:             {curl_line(plan, url)}")


def _keep_serving(detach: bool, serve_for: float | None) -> int:
    """After a successful start: return at once (detached), after `serve_for` s, or at Ctrl-C."""
    import signal
    import time

    from raylm.serve import shutdown

    if detach:
        print("detached:        it keeps running on the Ray cluster; stop it with `raylm shutdown`")
        return EXIT_OK

    def _interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the server as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, _interrupt)
    if serve_for is None:
        print("Ctrl-C stops it.")
    try:
        time.sleep(serve_for if serve_for is not None else 365 * 86400)
    except KeyboardInterrupt:
        pass
    shutdown()
    print("stopped.")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args)
    if spec is None:
        return EXIT_BAD_INPUT
    from raylm.cluster import StorageError
    from raylm.pipeline import GateFailed, NotReady, run_job

    try:
        result = run_job(spec, force=args.force, serve=not args.no_serve, address=args.address,
                         persistent=args.detach)
    except (StorageError, NotReady) as exc:  # NotReady: raised before any Ray work
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GateFailed as exc:
        print(f"\nerror: {exc}\nnothing was served; the winner stays at its checkpoint. Loosen "
              f"serve.promote_if or improve the run (e.g. training.max_steps).", file=sys.stderr)
        return EXIT_GATE
    except Exception as exc:
        print(f"\nerror: run {spec.name!r} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    w = result.winner
    print("\n=== raylm run: done ===")
    if result.moved_aside:
        print(f"previous run:    moved to {result.moved_aside}")
    print(f"winner:          {w.stage}{' (reused)' if w.reused else ''}: {w.detail}")
    print(f"checkpoint:      {w.checkpoint}  ({_fmt_metrics(w.metrics)})")
    if result.plan is None or result.url is None:
        print("served:          no (--no-serve); serve it later with `raylm serve " + args.job + "`")
        return EXIT_OK
    _print_served(result.plan, result.url)
    print(f"sample:          {result.plan.sample!r} → {result.answer!r}")
    return _keep_serving(args.detach, args.serve_for)


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    from raylm import submit

    spec = _load(args)
    if spec is None:
        return EXIT_BAD_INPUT
    if not args.no_serve and spec.serve is not None:
        from raylm.serve import api_key_digest

        try:
            api_key_digest(spec.serve)
        except ValueError as exc:
            print(f"error: {exc} (its value travels to the cluster in the job's runtime_env, never "
                  f"printed)", file=sys.stderr)
            return EXIT_BAD_INPUT
    run_args = [*(["--force"] if args.force else []), *(["--no-serve"] if args.no_serve else []),
                "--detach"]  # the job ends once its winner is served; Serve stays on the cluster
    with tempfile.TemporaryDirectory(prefix=f"raylm-submit-{spec.name}-") as tmp:
        try:
            staged = submit.stage_job(spec, tmp)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for note in staged.notes:
            print(f"note: {note}")
        for local, remote in staged.copied:
            print(f"carrying {local} → {remote}")
        address = submit.dashboard_address(args.address)
        try:
            c = submit.client(args.address)
            job_id = submit.submit(c, staged, run_args, args.pip, args.env)
        except Exception as exc:  # connection refused, 401 without the cluster's token, ...
            print(f"error: could not submit to the Ray Jobs API at {address}: {exc}", file=sys.stderr)
            return EXIT_FAILED
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
    import datetime

    from raylm import submit

    if args.action != "list" and not args.id:
        print(f"error: raylm jobs {args.action} needs a job ID (see `raylm jobs list`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        c = submit.client(args.address)
        if args.action == "list":
            rows = submit.list_jobs(c)
            for r in rows:
                when = datetime.datetime.fromtimestamp(r["start_time"]).strftime("%Y-%m-%d %H:%M:%S")
                print(f"{r['id']:<44} {r['status']:<10} {when}  {r['entrypoint']}")
            if not rows:
                print("no jobs")
            return EXIT_OK
        if args.action == "status":
            info = c.get_job_info(args.id)
            print(f"{args.id}: {info.status.value}" + (f" — {info.message}" if info.message else ""))
        elif args.action == "logs":
            if args.follow:
                print(f"\n{args.id}: {submit.follow(c, args.id)}")
            else:
                print(c.get_job_logs(args.id), end="")
        elif args.action == "stop":
            c.stop_job(args.id)
            print(f"{args.id}: {submit.wait(c, args.id, timeout_s=60)}")
    except Exception as exc:  # unknown id, unreachable cluster, missing token
        print(f"error: raylm jobs {args.action} at {submit.dashboard_address(args.address)}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    import ray

    from raylm.serve import shutdown

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        print(f"error: no Ray cluster at {address}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    stopped = shutdown()
    print("stopped the raylm Serve app" if stopped else "no raylm Serve app was running")
    return EXIT_OK


def cmd_warmup(args: argparse.Namespace) -> int:
    import time

    from raylm.deepspeed import warm_ops
    from raylm.models import materialize_tiny_llama

    t0 = time.time()
    print(f"built DeepSpeed ops: {', '.join(warm_ops()) or 'none needed'}")
    print(f"builtin model ready: {materialize_tiny_llama()}  ({time.time() - t0:.0f}s)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The `raylm` argument parser."""
    parser = argparse.ArgumentParser(prog="raylm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job", help="YAML job file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.lr=1e-4")
        return p

    job_command("validate", "check a job file; exit 0 if valid, 2 with every problem if not").set_defaults(
        func=cmd_validate)
    p = job_command("train", "fine-tune with Ray Train + DeepSpeed (re-running a job resumes it)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: RAY_ADDRESS, else start a local Ray)")
    p.set_defaults(func=cmd_train)
    p = job_command("tune", "sweep the job's tune.search with Ray Tune (ASHA) and promote the best trial")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument("--address", default=None, help="Ray cluster to attach to (default: local Ray)")
    p.set_defaults(func=cmd_tune)
    p = job_command("run", "the whole pipeline: sweep or train → gate (serve.promote_if) → serve the "
                    "winner → answer a sample request; finished stages are reused on a re-run")
    p.add_argument("--force", action="store_true",
                   help="train again even if this job finished (the old run is moved aside)")
    p.add_argument("--no-serve", action="store_true", help="stop after the gate")
    p.add_argument("--detach", action="store_true",
                   help="leave the winner served on the Ray cluster and exit (starts a local Ray head if none)")
    p.add_argument("--serve-for", type=float, default=None, metavar="SECONDS",
                   help="serve this long, then stop (0: answer the sample request and stop); "
                   "default: until Ctrl-C")
    p.add_argument("--address", default=None,
                   help="Ray cluster to attach to (default: RAY_ADDRESS, else start a local Ray)")
    p.set_defaults(func=cmd_run)
    p = job_command("submit", "send the job to a Ray cluster's Jobs API as `raylm run` (data it "
                    "names travels with it) and follow its logs")
    p.add_argument("--address", default=None,
                   help="Jobs API / dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS, "
                   "else http://127.0.0.1:8265)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following the logs")
    p.add_argument("--force", action="store_true", help="passed to `raylm run` on the cluster")
    p.add_argument("--no-serve", action="store_true", help="passed to `raylm run` on the cluster")
    p.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                   help="pip requirement for the job's runtime_env, by name; repeatable")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="environment variable to carry from here (value never printed); repeatable")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("jobs", help="Ray Jobs on a cluster: list | status ID | logs ID | stop ID")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (from `raylm submit` or `raylm jobs list`)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    p.add_argument("--address", default=None, help="Jobs API address (default: RAY_ADDRESS, else "
                   "http://127.0.0.1:8265)")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("export", help="merge a LoRA checkpoint into a plain HF model directory")
    p.add_argument("checkpoint", help="a raylm checkpoint directory")
    p.add_argument("out_dir", help="new directory for the merged model")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="serve a checkpoint, an export, or a job's winner over an "
                       "OpenAI-compatible HTTP API on Ray Serve")
    p.add_argument("target", help="job file (its promoted sweep winner or best training checkpoint), "
                   "checkpoint dir, or exported model dir")
    p.add_argument("overrides", nargs="*", help="serve.key=value overrides, e.g. serve.port=8001")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve this LoRA checkpoint (same base) as model NAME; repeatable")
    p.add_argument("--name", default=None, help="model name of TARGET (default: its job name)")
    p.add_argument("--detach", action="store_true",
                   help="leave it running on the Ray cluster (starts a local Ray head if none)")
    p.add_argument("--address", default=None, help="Ray cluster to attach to (default: local Ray)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("shutdown", help="stop the raylm Serve app on a Ray cluster")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local one)")
    p.set_defaults(func=cmd_shutdown)
    sub.add_parser("reference", help="print the job-file reference (Markdown)").set_defaults(
        func=lambda _args: print(reference_markdown(), end="") or EXIT_OK)
    sub.add_parser("warmup", help="prebuild DeepSpeed's JIT ops and the builtin model on this machine"
                   ).set_defaults(func=cmd_warmup)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `raylm` console script; returns the exit code."""
    # Progress must reach a log file or pipe as it happens, not when a buffer fills.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
