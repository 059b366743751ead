"""How much does raylm (Ray Train + DeepSpeed ZeRO-2, 2 workers) cost over a bare torchrun + gloo
DDP loop on the same model, data and steps?

Prints the steady-state step-time ratio (median step, goal ≤ 1.03) and the time from command to
first optimizer step for each (goal ≤ 20 s on 2 cores), and writes JSON.

    .venv/bin/python bench/train_overhead.py [--steps 300] [--out bench/results/train_overhead.json]
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def bench_job(tmp: str, steps: int) -> str:
    """The quickstart job, one eval at the end, no progress reports in between."""
    with open(os.path.join(REPO, "jobs", "quickstart.yaml")) as f:
        job = yaml.safe_load(f)
    job["name"] = "bench-overhead"
    job["storage_path"] = os.path.join(tmp, "runs")
    job["training"].update({"max_steps": steps, "eval_every": steps, "log_every": steps,
                            "report_every_s": 1e9, "eval_max_examples": 8})
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    return path


def run_raylm(job: str, tmp: str) -> dict:
    t0 = time.time()
    subprocess.run([os.path.join(BIN, "raylm"), "train", job], check=True, cwd=tmp,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    run_dir = os.path.join(tmp, "runs", "bench-overhead")
    last = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))[-1]
    with open(os.path.join(run_dir, last, "raylm.json")) as f:
        metrics = json.load(f)["metrics"]
    return {"step_time_p50_s": metrics["step_time_p50_s"],
            "first_step_s": metrics["first_step_unix"] - t0, "wall_s": wall}


def run_baseline(job: str, tmp: str) -> dict:
    out = os.path.join(tmp, "baseline.json")
    t0 = time.time()
    subprocess.run([os.path.join(BIN, "torchrun"), "--nproc_per_node", "2",
                    os.path.join(REPO, "bench", "_ddp_baseline.py"), job, out],
                   check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.time() - t0
    with open(out) as f:
        data = json.load(f)
    return {"step_time_p50_s": data["step_time_p50_s"],
            "first_step_s": data["first_step_unix"] - t0, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "train_overhead.json"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="raylm-bench-")
    try:
        job = bench_job(tmp, args.steps)
        base = run_baseline(job, tmp)
        raylm = run_raylm(job, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = raylm["step_time_p50_s"] / base["step_time_p50_s"]
    rows = [("torchrun + gloo DDP", base), ("raylm train (Ray Train + ZeRO-2)", raylm)]
    print(f"{'runner':34} {'p50 step (ms)':>14} {'to 1st step (s)':>16} {'wall (s)':>9}")
    for name, r in rows:
        print(f"{name:34} {r['step_time_p50_s'] * 1e3:14.2f} {r['first_step_s']:16.1f} {r['wall_s']:9.1f}")
    print(f"\nsteady-state step-time ratio raylm/baseline: {ratio:.3f}  (goal ≤ 1.03)")
    print(f"raylm command → first optimizer step: {raylm['first_step_s']:.1f} s  (goal ≤ 20 s)")
    result = {"steps": args.steps, "baseline": base, "raylm": raylm, "step_time_ratio": ratio,
              "goals": {"step_time_ratio": 1.03, "first_step_s": 20.0},
              "machine": {"cpus": os.cpu_count()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
