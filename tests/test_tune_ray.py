"""Real Ray Tune sweeps of real Train runs: ASHA stops bad trials, the best is promoted, the
report is written, an interrupted sweep resumes without re-running finished trials, and the
winner exports to a plain HF model."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raylm.job import load_job
from raylm.tuning.sweep import read_manifest, run_sweep, sweep_dir

from .conftest import REPO, tiny_job

pytestmark = pytest.mark.ray


def tune_state(root: str) -> dict[str, dict]:
    """Tune's own record of each trial (status, start time, last result) from its experiment
    state."""
    files = sorted(glob.glob(os.path.join(root, "tuner", "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.load(open(files[-1]))
    except json.JSONDecodeError:  # caught mid-write
        return {}
    out = {}
    for static, runtime in data["trial_data"]:
        meta, run = json.loads(static), json.loads(runtime)
        out[meta["trial_id"]] = {
            "status": meta["status"],
            "start_time": run["start_time"],
            "step": (run.get("last_result") or {}).get("step"),
        }
    return out


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    """A 6-trial lr × rank sweep, killed once a trial has finished while another is mid-run
    past its first checkpoint, then `raylm tune --resume`."""
    tmp = tmp_path_factory.mktemp("sweep")
    job = tiny_job(
        tmp,
        name="sweep",
        scaling={"num_workers": 1, "cpus_per_worker": 0.9},
        training={"max_steps": 60, "eval_every": 20},
        tune={
            "num_samples": 1,
            "grace_period": 20,
            "reduction_factor": 3,
            # Tune runs the grid with lora.r varying fastest, two trials at a time: the 1e-3 pair
            # finishes first, then a 3e-3 trial beats the pair at ASHA's step-20 rung and runs on:
            # the kill below needs exactly that (a finished trial and one mid-run), every time.
            "search": {"training.lr": {"grid": [1e-3, 3e-3, 1e-6]}, "lora.r": {"grid": [4, 8]}},
        },
    )
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spec = load_job(path)
    root = sweep_dir(spec)
    log = open(tmp / "first.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "tune", str(path), "--address", ray_cluster],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
        # Tune saves its experiment state every few seconds by default: a short trial can start
        # and finish between two saves, and the kill below needs to see it mid-run.
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"},
    )
    deadline = time.time() + 400

    def interrupted(state: dict) -> dict:
        """Trials running with a checkpoint (an eval reported) and two evals still to go: Tune's
        state lags the trial, so one seen at step 40 may have finished before the kill lands."""
        return {
            tid: t
            for tid, t in state.items()
            if t["status"] == "RUNNING" and 20 <= (t["step"] or 0) < 40
        }

    try:
        while True:
            state = tune_state(root)
            if any(t["status"] == "TERMINATED" for t in state.values()) and interrupted(state):
                break
            assert proc.poll() is None, open(tmp / "first.log").read()[-3000:]
            assert time.time() < deadline, f"no finished and interrupted trial in time: {state}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    before = tune_state(root)
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "raylm.cli",
            "tune",
            str(path),
            "--resume",
            "--address",
            ray_cluster,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = tune_state(root)
    # Resuming a finished sweep runs nothing more; it hands back the same results to inspect.
    result = run_sweep(spec, resume=True)
    assert tune_state(root) == after
    return {
        "spec": spec,
        "interrupted": interrupted(before),
        "killed_at": killed_at,
        "before": before,
        "after": after,
        "result": result,
        "first_log": open(tmp / "first.log").read(),
        "resume_log": resumed.stdout,
    }


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    before, after = sweep["before"], sweep["after"]
    finished = {tid: t for tid, t in before.items() if t["status"] == "TERMINATED"}
    assert finished, before
    # ...and the kill left work for the resume: trials running or not yet started.
    assert len(before) < 6 or any(t["status"] != "TERMINATED" for t in before.values()), before
    assert len(after) == 6 and all(t["status"] == "TERMINATED" for t in after.values())
    for tid, t in finished.items():  # same start time and last step: Tune did not run them again
        assert after[tid]["start_time"] == t["start_time"], tid
        assert after[tid]["step"] == t["step"], tid
    assert "[raylm tune] trial" in sweep["first_log"]  # live sweep progress
    assert (
        "[raylm tune] trial" in sweep["resume_log"]
    )  # the resumed trials ran in `raylm tune --resume`


def trial_checkpoints(root: str) -> list[tuple[str, dict]]:
    """(trial id, raylm.json) of every whole checkpoint the sweep's trials left on disk."""
    from raylm.checkpoint import checkpoint_problems

    out = []
    for meta in glob.glob(os.path.join(root, "trials", "trial-*", "checkpoint_*", "raylm.json")):
        ckpt = os.path.dirname(meta)
        if not checkpoint_problems(ckpt):
            trial = os.path.basename(os.path.dirname(ckpt)).removeprefix("trial-")
            out.append((trial, json.load(open(meta))))
    return out


def test_interrupted_trials_resume_from_their_own_checkpoints(sweep):
    root = sweep_dir(sweep["spec"])
    assert sweep["interrupted"], sweep["before"]
    resumed = 0
    for tid, seen in sweep["interrupted"].items():
        metas = [m for t, m in trial_checkpoints(root) if t == tid]
        last = max(metas, key=lambda m: (m["step"], m["created_unix"]))  # the newest
        assert last["step"] == 60, (tid, last["step"])
        if last["created_unix"] < sweep["killed_at"]:
            # It finished in the moment between Tune's last saved state and the kill: the
            # resume must not have trained it again.
            assert not [m for m in metas if m["created_unix"] >= sweep["killed_at"]], tid
            continue
        # It continued from a checkpoint at or after the step it had reached, not from 0.
        assert len(last["resumes"]) == 1 and last["resumes"][0] >= seen["step"], (tid, last)
        steps = [h["step"] for h in last["history"]]
        assert steps == sorted(set(steps)), steps  # no step counted twice
        resumed += 1
    assert resumed, sweep["interrupted"]  # at least one was really cut off mid-run


def test_asha_stops_trials_with_bad_learning_rates_early(sweep):
    rows = sweep["result"].rows
    assert len(rows) == 6
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["step"] < r["total_steps"] for r in stopped)
    tiny_lr = [r for r in rows if r["training.lr"] == pytest.approx(1e-6)]
    assert len(tiny_lr) == 2
    assert all(r["status"] == "stopped early" for r in tiny_lr)
    assert any(r["status"] == "finished" for r in rows)


def test_promoted_trial_has_the_best_metric_of_all(sweep):
    manifest = read_manifest(sweep["spec"])
    assert manifest == sweep["result"].manifest
    # The best over every trial's own checkpoints on disk, not over what run_sweep reports.
    on_disk = trial_checkpoints(sweep_dir(sweep["spec"]))
    assert {t for t, _ in on_disk} == set(sweep["after"])  # every trial left a checkpoint
    best = min(m["metrics"]["eval_loss"] for _, m in on_disk)
    assert manifest["eval_loss"] == pytest.approx(best)
    assert os.path.dirname(manifest["checkpoint"]).endswith(f"trial-{manifest['trial_id']}")
    promoted = json.load(open(os.path.join(manifest["checkpoint"], "raylm.json")))
    assert promoted["metrics"]["eval_loss"] == pytest.approx(best)
    # The manifest's config is the promoted trial's own: what its checkpoint was trained with.
    trained = promoted["spec"]
    assert manifest["config"] == {
        "training.lr": trained["training"]["lr"],
        "lora.r": trained["lora"]["r"],
    }
    assert 1 <= len(manifest["top_k"]) <= 3


def test_sweep_report_files(sweep):
    from PIL import Image

    files = sweep["result"].files
    with open(files["csv"]) as f:
        lines = f.read().splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["rank", "trial_id"] and len(lines) == 7
    assert {"training.lr", "lora.r", "eval_loss", "status", "checkpoint"} <= set(header)
    assert len(json.load(open(files["json"]))) == 6
    for key in ("heatmap", "curves"):
        with Image.open(files[key]) as img:
            img.load()
            assert img.size[0] >= 400 and img.size[1] >= 300


EXPORT_CHECK = r"""
import json, sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
ckpt, exported = sys.argv[1], sys.argv[2]
ids = load_file(ckpt + "/probe.safetensors")["input_ids"][None]
merged = AutoModelForCausalLM.from_pretrained(exported).eval()
base_path = json.load(open(ckpt + "/adapter_config.json"))["base_model_name_or_path"]
base = AutoModelForCausalLM.from_pretrained(base_path)
adapter = PeftModel.from_pretrained(base, ckpt).eval()
with torch.no_grad():
    a, b = merged(input_ids=ids).logits, adapter(input_ids=ids).logits
print(json.dumps({"diff": (a - b).abs().max().item(), "scale": b.abs().max().item(),
                  "peft_in_merged": any("lora" in n for n, _ in merged.named_parameters())}))
"""


def test_exported_winner_loads_with_plain_transformers(sweep, tmp_path):
    from raylm.cli import main

    ckpt = sweep["result"].manifest["checkpoint"]
    out = tmp_path / "exported"
    assert main(["export", ckpt, str(out)]) == 0
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert main(["export", ckpt, str(out)]) == 2  # never overwrites
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, ckpt, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peft_in_merged"] is False
    assert report["diff"] < 1e-4 * max(1.0, report["scale"]), report
