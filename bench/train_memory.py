"""How much memory does each worker of a `raylm train` run take on a real model, by ZeRO stage and
LoRA vs full fine-tuning?

Runs the SmolLM2 chat job for a few steps (2 workers) at ZeRO 0, 2 and 3, with LoRA and with full
fine-tuning, samples every Ray Train worker's resident memory (psutil, every 0.2 s) and prints
each configuration's peak per worker, with the ratios the goals name (ZeRO-3 ÷ ZeRO-0 for full
fine-tuning ≤ 0.6; LoRA ÷ full at the same stage ≤ 0.5). Writes JSON.

    .venv/bin/python bench/train_memory.py [--steps 4] [--out bench/results/train_memory.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml
from _common import write_result  # bench/ is on sys.path when run as a script
from train_overhead import bench_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MODEL = "builtin:smollm2-135m-instruct"


def workers() -> list[psutil.Process]:
    """Ray Train's worker processes (Ray names them `ray::RayTrainWorker…`)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            out.append(proc)
    return out


def peak_rss(job: str, cwd: str) -> dict:
    """Runs `raylm train JOB`, sampling worker memory; returns peaks in MiB."""
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for proc in workers():
                try:
                    peaks[proc.pid] = max(peaks.get(proc.pid, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    try:
        subprocess.run(
            [os.path.join(BIN, "raylm"), "train", job],
            check=True,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        done.set()
        sampler.join()
    per_worker = sorted((v / 2**20 for v in peaks.values()), reverse=True)[:2]
    return {
        "peak_rss_mib": per_worker,
        "max_mib": max(per_worker, default=0.0),
        "wall_s": time.time() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--out", default=os.path.join(REPO, "bench", "results", "train_memory.json")
    )
    args = parser.parse_args()
    rows = {}
    for lora in (True, False):
        for stage in (0, 2, 3):
            tmp = tempfile.mkdtemp(prefix="raylm-mem-")
            try:
                path = bench_job(tmp, args.steps, MODEL)
                with open(path) as f:
                    job = yaml.safe_load(f)
                job["deepspeed"]["zero_stage"] = stage
                job["lora"]["enabled"] = lora
                job["training"]["lr"] = 1e-4 if not lora else job["training"]["lr"]
                job["data"]["num_examples"] = 64
                with open(path, "w") as f:
                    yaml.safe_dump(job, f)
                key = f"zero{stage}-{'lora' if lora else 'full'}"
                rows[key] = peak_rss(path, tmp)
                print(
                    f"{key:12} peak RSS per worker {rows[key]['max_mib']:8.0f} MiB "
                    f"({rows[key]['wall_s']:.0f} s)",
                    flush=True,
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    ratios = {
        "zero3_over_zero0_full": rows["zero3-full"]["max_mib"] / rows["zero0-full"]["max_mib"],
        **{
            f"lora_over_full_zero{s}": rows[f"zero{s}-lora"]["max_mib"]
            / rows[f"zero{s}-full"]["max_mib"]
            for s in (0, 2, 3)
        },
    }
    for name, value in ratios.items():
        print(f"{name:26} {value:.2f}")
    print("goals: zero3_over_zero0_full ≤ 0.6, lora_over_full ≤ 0.5")
    write_result(
        args.out,
        {
            "model": MODEL,
            "steps": args.steps,
            "workers": 2,
            "runs": rows,
            "ratios": ratios,
            "goals": {"zero3_over_zero0_full": 0.6, "lora_over_full": 0.5},
        },
    )


if __name__ == "__main__":
    main()
