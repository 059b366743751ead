"""How much sweep work does ASHA save? The same lr × rank space run as a full grid (no early
stopping) and with ASHA; prints the ratio of trial-steps ASHA spent to the grid's (goal ≤ 0.40),
whether ASHA still reached the grid's best metric, and both wall times; writes JSON.

    .venv/bin/python bench/tune_efficiency.py [--steps 120] \
        [--out bench/results/tune_efficiency.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import yaml
from _common import write_result  # bench/ is on sys.path when run as a script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LRS = [1e-6, 1e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 8]


def sweep_job(tmp: str, name: str, scheduler: str, steps: int) -> dict:
    with open(os.path.join(REPO, "jobs", "quickstart.yaml")) as f:
        job = yaml.safe_load(f)
    job.update(name=name, storage_path=os.path.join(tmp, "runs"))
    job["scaling"] = {"num_workers": 1, "cpus_per_worker": 0.9}
    job["training"].update(max_steps=steps, eval_every=20, eval_max_examples=16, report_every_s=1e9)
    job["tune"] = {
        "num_samples": 1,
        "scheduler": scheduler,
        "grace_period": 20,
        "reduction_factor": 3,
        "search": {"training.lr": {"grid": LRS}, "lora.r": {"grid": RANKS}},
    }
    return job


def run(job: dict) -> dict:
    from raylm.job import spec_from_dict
    from raylm.tuning.sweep import run_sweep

    t0 = time.time()
    result = run_sweep(spec_from_dict(job))
    rows = result.rows
    return {
        "wall_s": time.time() - t0,
        "trial_steps": sum(r["step"] for r in rows),
        "best_eval_loss": result.manifest["eval_loss"],
        "best_config": result.manifest["config"],
        "stopped_early": sum(r["status"] == "stopped early" for r in rows),
        "trials": len(rows),
    }


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument(
        "--out", default=os.path.join(REPO, "bench", "results", "tune_efficiency.json")
    )
    args = parser.parse_args()
    # Dashboard on: Ray Train frees stopped trials' worker resources through the State API.
    ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="raylm-bench-tune-")
    try:
        grid = run(sweep_job(tmp, "grid", "none", args.steps))
        asha = run(sweep_job(tmp, "asha", "asha", args.steps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = asha["trial_steps"] / grid["trial_steps"]
    reached = asha["best_eval_loss"] <= grid["best_eval_loss"] + 1e-9
    print(
        f"{'sweep':6} {'trials':>6} {'stopped':>8} {'trial-steps':>12} "
        f"{'best eval_loss':>15} {'wall (s)':>9}"
    )
    for name, r in (("grid", grid), ("asha", asha)):
        print(
            f"{name:6} {r['trials']:6d} {r['stopped_early']:8d} {r['trial_steps']:12d} "
            f"{r['best_eval_loss']:15.4f} {r['wall_s']:9.1f}"
        )
    print(
        f"\nASHA trial-steps / grid trial-steps: {ratio:.3f}  (goal ≤ 0.40); "
        f"ASHA reached the grid's best: {reached}"
    )
    result = {
        "steps": args.steps,
        "space": {"training.lr": LRS, "lora.r": RANKS},
        "grid": grid,
        "asha": asha,
        "trial_step_ratio": ratio,
        "asha_reached_grid_best": reached,
        "goal": 0.40,
        "machine": {"cpus": os.cpu_count()},
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
