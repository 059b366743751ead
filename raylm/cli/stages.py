"""The stage commands: validate, train, tune, run, serve, export."""

from __future__ import annotations

import argparse
from typing import Any

from raylm.cli.common import EXIT_OK, fail, load
from raylm.errors import InputError, RaylmError
from raylm.tasks import TASKS, format_metrics


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load(args)
    tr, sc, ds = spec.training, spec.scaling, spec.deepspeed
    workers = f"{sc.min_workers}–{sc.max_workers}" if sc.elastic else str(sc.max_workers)
    print(
        f"ok: {args.job} → job {spec.name!r}: {spec.model.name_or_path} ({spec.model.task}), "
        f"{'LoRA r=' + str(spec.lora.r) if spec.lora.enabled else 'full fine-tuning'}, "
        f"ZeRO-{ds.zero_stage}, {workers} worker(s){' on GPU' if sc.use_gpu else ''}, "
        f"global batch {tr.micro_batch_size * tr.grad_accum * sc.max_workers}, {spec.precision}"
    )
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    spec = load(args)
    from raylm.cluster import ensure_ray
    from raylm.training.trainer import run_train

    ensure_ray(args.address)
    try:
        result = run_train(spec)
    except RaylmError:
        raise
    except Exception as exc:  # the run's own traceback is already in the log above
        raise fail(f"training {spec.name!r}", exc) from None
    print("\n=== raylm train: done ===")
    print(f"run dir:          {result.run_dir}")
    print(f"best checkpoint:  {result.best_checkpoint}  ({format_metrics(result.best_metrics)})")
    print(f"last checkpoint:  {result.checkpoint}")
    if result.history:
        first, last = result.history[0], result.history[-1]
        print(f"eval:             {format_metrics(first)}  →  {format_metrics(last)}")
        print(f"report:           {result.run_dir}/metrics.jsonl, {result.run_dir}/loss_curve.png")
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    spec = load(args)
    if spec.tune is None or not spec.tune.search:
        raise InputError(f"{args.job}: tune.search is empty; nothing to sweep")
    from raylm.cluster import ensure_ray
    from raylm.report import format_sweep_table
    from raylm.tuning.sweep import run_sweep, sweep_dir

    ensure_ray(args.address)
    try:
        result = run_sweep(spec, resume=args.resume)
    except RaylmError:
        raise
    except Exception as exc:
        raise fail(f"sweep {spec.name!r}", exc) from None
    m = result.manifest
    print("\n=== raylm tune: done ===")
    print(format_sweep_table(result.rows, spec.tune.metric, list(spec.tune.search)))
    print(f"\npromoted: trial {m['trial_id']} {m['config']}  {m['metric']}={m[m['metric']]:.4g}")
    print(f"checkpoint: {m['checkpoint']}")
    print(f"report:     {sweep_dir(spec)}/results.csv, results.json, heatmap.png, curves.png")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from raylm.checkpoint import export_merged, task_of

    try:
        out = export_merged(args.checkpoint, args.out_dir)
    except RaylmError:
        raise
    except Exception as exc:
        raise fail(f"exporting {args.checkpoint}", exc) from None
    print(
        f"exported {args.checkpoint} → {out} (load with "
        f"{TASKS[task_of(out)].auto_class}.from_pretrained)"
    )
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from raylm.serving.deploy import api_key_digest, resolve_target

    plan = resolve_target(args.target, args.overrides, args.adapter, args.name)
    api_key_digest(plan.spec)  # refuse a missing key before starting anything
    from raylm.cluster import ensure_ray
    from raylm.serving.deploy import start

    ensure_ray(args.address, persistent=args.detach)
    try:
        url = start(plan)
    except Exception as exc:
        raise fail(f"serving {args.target}", exc) from None
    print("\n=== raylm serve: up ===")
    for note in plan.notes:
        print(f"serving          {note}")
    _print_served(plan, url)
    return _keep_serving(args.detach, None)


def _print_served(plan: Any, url: str) -> None:
    from raylm.serving.deploy import curl_line

    print(f"models:          {', '.join(n for n, _ in plan.models)}")
    print(f"url:             {url}/v1  (OpenAI-compatible; health: {url}/health)")
    print(f"try:             {curl_line(plan, url)}")


def _keep_serving(detach: bool, serve_for: float | None) -> int:
    """After a successful start: return at once (detached), after `serve_for` s, or at Ctrl-C."""
    import signal
    import time

    from raylm.serving.deploy import shutdown

    if detach:
        print(
            "detached:        it keeps running on the Ray cluster; stop it with `raylm shutdown` "
            "(and a local Ray head with `ray stop`)"
        )
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
    spec = load(args)
    from raylm.errors import GateFailed
    from raylm.pipeline import run_job

    try:
        result = run_job(
            spec,
            force=args.force,
            serve=not args.no_serve,
            address=args.address,
            persistent=args.detach,
        )
    except GateFailed as exc:
        exc.hint = (
            "nothing was served; the winner stays at its checkpoint. Loosen "
            "serve.promote_if or improve the run (e.g. training.max_steps)."
        )
        raise
    except RaylmError:
        raise
    except Exception as exc:
        raise fail(f"run {spec.name!r}", exc) from None
    w = result.winner
    print("\n=== raylm run: done ===")
    if result.moved_aside:
        print(f"previous run:    moved to {result.moved_aside}")
    print(f"winner:          {w.stage}{' (reused)' if w.reused else ''}: {w.detail}")
    print(f"checkpoint:      {w.checkpoint}  ({format_metrics(w.metrics)})")
    if result.plan is None or result.url is None:
        print(
            "served:          no (--no-serve); serve it later with `raylm serve " + args.job + "`"
        )
        return EXIT_OK
    _print_served(result.plan, result.url)
    print(f"sample:          {result.plan.sample!r} → {result.answer!r}")
    return _keep_serving(args.detach, args.serve_for)
