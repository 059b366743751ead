"""How much does raylm (Ray Train + DeepSpeed ZeRO-2, 2 workers) cost over a bare torchrun + gloo
DDP loop on the same model, data and steps?

Prints the steady-state step-time ratio (median step, goal ≤ 1.03) and the time from command to
first optimizer step for each (goal ≤ 20 s on 2 cores), and writes JSON.

    .venv/bin/python bench/train_overhead.py [--steps 300] [--out bench/results/train_overhead.json]
    .venv/bin/python bench/train_overhead.py --model builtin:smollm2-135m-instruct --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import yaml
from _common import write_result  # bench/ is on sys.path when run as a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


JOBS = {
    "builtin:tiny-llama": "quickstart.yaml",
    "builtin:smollm2-135m-instruct": "smollm2-chat.yaml",
}


def bench_job(tmp: str, steps: int, model: str = "builtin:tiny-llama") -> str:
    """The model's shipped job (the quickstart for other models), one eval at the end, no
    progress reports or generation in between."""
    with open(os.path.join(REPO, "jobs", JOBS.get(model, "quickstart.yaml"))) as f:
        job = yaml.safe_load(f)
    job["name"] = "bench-overhead"
    job["storage_path"] = os.path.join(tmp, "runs")
    job["model"]["name_or_path"] = model
    for key in ("train", "eval"):  # the shipped jobs name their data from the repository root
        source = job["data"].get(key)
        if source and os.path.exists(os.path.join(REPO, source)):
            job["data"][key] = os.path.join(REPO, source)
    job["training"].update(
        {
            "max_steps": steps,
            "eval_every": steps,
            "log_every": steps,
            "report_every_s": 1e9,
            "eval_max_examples": 8,
        }
    )
    if model != "builtin:tiny-llama":
        job["training"]["eval_exact_match"] = False
        job["checkpoint"].update({"metric": "eval_loss", "mode": "min"})
        job.pop("serve", None)
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


def run_raylm(job: str, tmp: str) -> dict:
    t0 = time.time()
    subprocess.run(
        [os.path.join(BIN, "raylm"), "train", job],
        check=True,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.time() - t0
    run_dir = os.path.join(tmp, "runs", "bench-overhead")
    last = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))[-1]
    with open(os.path.join(run_dir, last, "raylm.json")) as f:
        metrics = json.load(f)["metrics"]
    return {
        "step_time_p50_s": metrics["step_time_p50_s"],
        "first_step_s": metrics["first_step_unix"] - t0,
        "wall_s": wall,
        "startup": {  # where the time to the first step goes
            "ray_start_and_worker_spawn_s": metrics["worker_start_unix"] - t0,
            "worker_imports_model_data_deepspeed_init_s": metrics["engine_ready_unix"]
            - metrics["worker_start_unix"],
            "initial_eval_and_first_step_s": metrics["first_step_unix"]
            - metrics["engine_ready_unix"],
        },
    }


def run_baseline(job: str, tmp: str, mode: str = "ddp") -> dict:
    out = os.path.join(tmp, f"baseline-{mode}.json")
    t0 = time.time()
    subprocess.run(
        [
            os.path.join(BIN, "torchrun"),
            "--nproc_per_node",
            "2",
            os.path.join(REPO, "bench", "_ddp_baseline.py"),
            job,
            out,
            mode,
        ],
        check=True,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.time() - t0
    with open(out) as f:
        data = json.load(f)
    return {
        "step_time_p50_s": data["step_time_p50_s"],
        "first_step_s": data["first_step_unix"] - t0,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="builtin:tiny-llama", help="model of the bench job")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="interleaved runs of each; the best of each side is compared",
    )
    parser.add_argument(
        "--out", default=os.path.join(REPO, "bench", "results", "train_overhead.json")
    )
    args = parser.parse_args()
    bases, dss, raylms = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        tmp = tempfile.mkdtemp(prefix="raylm-bench-")
        try:
            job = bench_job(tmp, args.steps, args.model)
            bases.append(run_baseline(job, tmp))
            dss.append(run_baseline(job, tmp, "deepspeed"))
            raylms.append(run_raylm(job, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    base = min(bases, key=lambda r: r["step_time_p50_s"])
    ds_only = min(dss, key=lambda r: r["step_time_p50_s"])
    raylm = min(raylms, key=lambda r: r["step_time_p50_s"])
    raylm_first = min(raylms, key=lambda r: r["first_step_s"])
    ratio = raylm["step_time_p50_s"] / base["step_time_p50_s"]
    rows = [
        ("torchrun + gloo DDP", base),
        ("torchrun + DeepSpeed ZeRO-2", ds_only),
        ("raylm train (Ray Train + ZeRO-2)", raylm),
    ]
    raylm = {**raylm, "first_step_s": raylm_first["first_step_s"]}
    print(f"{'runner':34} {'p50 step (ms)':>14} {'to 1st step (s)':>16} {'wall (s)':>9}")
    for name, r in rows:
        print(
            f"{name:34} {r['step_time_p50_s'] * 1e3:14.2f} {r['first_step_s']:16.1f} "
            f"{r['wall_s']:9.1f}"
        )
    print(f"\nsteady-state step-time ratio raylm/baseline: {ratio:.3f}  (goal ≤ 1.03)")
    print(
        "  of which DeepSpeed (torchrun+DeepSpeed / DDP): "
        f"{ds_only['step_time_p50_s'] / base['step_time_p50_s']:.3f}"
        ", Ray + raylm (raylm / torchrun+DeepSpeed): "
        f"{raylm['step_time_p50_s'] / ds_only['step_time_p50_s']:.3f}"
    )
    print(
        f"raylm command → first optimizer step: {raylm_first['first_step_s']:.1f} s  (goal ≤ 20 s)"
    )
    for part, seconds in raylm_first["startup"].items():
        print(f"  {part:45} {seconds:5.1f} s")
    print(f"(best of {args.repeats} interleaved runs each; all runs are in the JSON)")
    result = {
        "model": args.model,
        "steps": args.steps,
        "repeats": args.repeats,
        "baseline_runs": bases,
        "deepspeed_runs": dss,
        "raylm_runs": raylms,
        "step_time_ratio": ratio,
        "deepspeed_over_ddp": ds_only["step_time_p50_s"] / base["step_time_p50_s"],
        "raylm_over_deepspeed": raylm["step_time_p50_s"] / ds_only["step_time_p50_s"],
        "first_step_s": raylm_first["first_step_s"],
        "goals": {"step_time_ratio": 1.03, "first_step_s": 20.0},
        "machine": {"cpus": os.cpu_count()},
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
