"""Bad job files never reach Ray: the tests/bad_jobs corpus (each file says what its error must
name) through `raylm run` and `raylm train`; and a property test that every job the spec accepts
builds a DeepSpeed config DeepSpeed's own parser accepts."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raylm.job import JobSpecError, spec_from_dict
from raylm.training.ds_config import build_ds_config

from .conftest import REPO

CORPUS = os.path.join(REPO, "tests", "bad_jobs")

# Runs every corpus file through the CLI in one process (each would otherwise pay the import
# cost), then says whether anything imported Ray or started a child process.
DRIVER = r"""
import contextlib, io, json, sys
import psutil
from raylm.cli import main
out = {}
for path in sys.argv[1:]:
    for command in ("run", "train"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([command, path])
        out[f"{command} {path}"] = [rc, err.getvalue()]
print(json.dumps({"results": out, "ray_imported": "ray" in sys.modules,
                  "children": len(psutil.Process().children(recursive=True))}))
"""


def expectations(path: str) -> list[str]:
    with open(path, "rb") as f:
        head = f.read().decode("utf-8", "replace").splitlines()
    return [line.split("# expect:", 1)[1].strip() for line in head if line.startswith("# expect:")]


def test_every_bad_job_file_exits_2_naming_its_field_and_value_before_any_ray_work():
    files = sorted(glob.glob(os.path.join(CORPUS, "*.yaml")))
    assert len(files) == 102  # README and docs/reliability.md say so
    assert all(expectations(f) for f in files), [f for f in files if not expectations(f)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CORPUS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = []
    for key, (rc, err) in report["results"].items():
        path = key.split(" ", 1)[1]
        missing = [e for e in expectations(path) if e not in err]
        if rc != 2 or missing or "Traceback" in err:
            wrong.append((os.path.basename(path), key.split()[0], rc, missing, err[-300:]))
    assert not wrong, wrong[:5]
    assert report["ray_imported"] is False and report["children"] == 0
    print(
        f"bad job files: {len(files)} files × 2 commands = {len(report['results'])} refusals, "
        "all exit 2"
    )


def test_the_real_console_script_exits_2_on_a_bad_job():
    path = os.path.join(CORPUS, "several_problems_at_once.yaml")
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "raylm"), "run", path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert all(e in proc.stderr for e in expectations(path)), proc.stderr
    assert "3 problem(s)" in proc.stderr


# -- property: whatever validates, DeepSpeed accepts ----------------------------------------------

jobs = st.fixed_dictionaries(
    {
        "lora": st.fixed_dictionaries({"enabled": st.booleans(), "r": st.integers(1, 64)}),
        "training": st.fixed_dictionaries(
            {
                "micro_batch_size": st.integers(0, 32),
                "grad_accum": st.integers(0, 8),
                "lr": st.floats(1e-7, 1.0),
                "weight_decay": st.floats(0.0, 1.0),
                "warmup_ratio": st.floats(0.0, 0.99),
                "max_grad_norm": st.floats(0.0, 10.0),
                "lr_schedule": st.sampled_from(["cosine", "linear", "constant"]),
                "precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
                "max_steps": st.integers(1, 100_000),
            }
        ),
        "deepspeed": st.fixed_dictionaries(
            {
                "zero_stage": st.integers(-1, 4),
                "offload_optimizer": st.booleans(),
                "offload_params": st.booleans(),
            }
        ),
        "scaling": st.fixed_dictionaries(
            {"num_workers": st.integers(1, 64), "use_gpu": st.booleans()}
        ),
    }
)


def test_any_job_that_validates_builds_a_config_deepspeed_accepts():
    from deepspeed.runtime.config import DeepSpeedConfig

    accepted = []

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(jobs)
    def check(job):
        try:
            spec = spec_from_dict(job)
        except JobSpecError:
            return  # refused with named fields (the corpus above checks the messages)
        accepted.append(spec)
        tr, ds, workers = spec.training, spec.deepspeed, spec.scaling.num_workers
        config = build_ds_config(spec, world_size=workers, total_steps=tr.max_steps)
        assert config["train_batch_size"] == tr.micro_batch_size * tr.grad_accum * workers
        # Outside a process group DeepSpeed checks batch sizes against a world of 1.
        parsed = DeepSpeedConfig(
            build_ds_config(spec, world_size=1, total_steps=tr.max_steps), mpu=None
        )
        assert parsed.zero_optimization_stage == ds.zero_stage
        assert parsed.train_micro_batch_size_per_gpu == tr.micro_batch_size
        assert parsed.gradient_accumulation_steps == tr.grad_accum
        assert parsed.bfloat16_config.enabled == (spec.precision == "bf16")
        assert parsed.float16_config.enabled == (spec.precision == "fp16")
        for block, asked in (
            (parsed.zero_config.offload_optimizer, ds.offload_optimizer),
            (parsed.zero_config.offload_param, ds.offload_params),
        ):
            assert (block is not None and block.device == "cpu") == asked

    check()
    # The property held for real jobs, not only for refusals: every stage and both offloads.
    assert len(accepted) >= 30, len(accepted)
    assert {s.deepspeed.zero_stage for s in accepted} == {0, 1, 2, 3}
    assert any(s.deepspeed.offload_params for s in accepted)
    assert any(s.deepspeed.offload_optimizer for s in accepted)
