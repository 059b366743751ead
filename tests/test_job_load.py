"""raylm.job.load: YAML job files, `key=value` overrides, relative local paths made absolute,
and validation that names every bad field (exit code 2, before any work)."""

from __future__ import annotations

import os

import pytest
import yaml

from raylm.errors import JobSpecError, PathError
from raylm.job import (
    LOCAL_SOURCE_FIELDS,
    JobSpec,
    ServeSpec,
    load_job,
    parse_overrides,
    serve_spec_from_dict,
    spec_from_dict,
)
from raylm.job.load import _absolute, absolute_sources

# -- overrides ------------------------------------------------------------------------------


def test_overrides_nest_by_dotted_key_with_yaml_values():
    tree, problems = parse_overrides(
        ["training.lr=0.001", "lora.enabled=false", "lora.target_modules=[q, v]", "name=x"]
    )
    assert problems == []
    assert tree == {
        "training": {"lr": 0.001},
        "lora": {"enabled": False, "target_modules": ["q", "v"]},
        "name": "x",
    }


def test_override_values():
    tree, _ = parse_overrides(
        ["a.empty=", "a.null=null", "a.text=hello world", "a.eq=b=c", "a.bad=[unclosed", "a.n=3"]
    )
    assert tree == {
        "a": {
            "empty": "",
            "null": None,
            "text": "hello world",
            "eq": "b=c",  # only the first `=` splits
            "bad": "[unclosed",  # not YAML: kept as the text given
            "n": 3,
        }
    }


def test_a_later_override_of_the_same_key_wins():
    assert parse_overrides(["a.b=1", "a.b=2", "a.c=3"]) == ({"a": {"b": 2, "c": 3}}, [])


@pytest.mark.parametrize("key", ["a", "_a", "A.b_c", "a-b.c-d", "x1.y2", "a.b.c.d"])
def test_good_override_keys(key):
    tree, problems = parse_overrides([f"{key}=1"])
    assert problems == []
    node = tree
    for part in key.split(".")[:-1]:
        node = node[part]
    assert node[key.split(".")[-1]] == 1


@pytest.mark.parametrize(
    "item", ["training.lr", "=3", "a..b=1", "1a=2", "-a=1", "a b=1", "a/b=1", ".a=1"]
)
def test_bad_override_keys_are_problems_naming_the_override(item):
    tree, problems = parse_overrides(["ok=1", item])
    assert tree == {"ok": 1}
    assert problems == [f"override {item!r}: expected dotted.key=value"]


def test_an_override_below_a_value_is_a_problem():
    tree, problems = parse_overrides(["a=1", "a.b=2", "c.d=3"])
    assert tree == {"a": 1, "c": {"d": 3}}
    assert problems == ["override 'a.b=2': a is already set to a value"]
    tree, problems = parse_overrides(["x.y=1", "x.y.z.w=2"])
    assert tree == {"x": {"y": 1}}
    assert problems == ["override 'x.y.z.w=2': y is already set to a value"]


def test_no_overrides():
    assert parse_overrides([]) == ({}, [])


# -- validating dicts -----------------------------------------------------------------------


def test_spec_from_dict_validates():
    spec = spec_from_dict({"name": "abc", "training": {"lr": 0.01}})
    assert isinstance(spec, JobSpec) and spec.name == "abc" and spec.training.lr == 0.01


@pytest.mark.parametrize("data, kind", [([1, 2], "list"), ("text", "str"), (None, "NoneType")])
def test_a_job_that_is_not_a_mapping(data, kind):
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(data, source="j.yaml")
    err = info.value
    assert err.exit_code == 2 and err.source == "j.yaml"
    assert err.problems == [f"(top level): expected a mapping of sections, got {kind}"]


def test_spec_from_dict_lists_every_problem_under_its_source():
    with pytest.raises(JobSpecError) as info:
        spec_from_dict({"lora": {"r": 0}, "training": {"lr": "fast"}, "extra": 1}, "my.yaml")
    err = info.value
    assert err.source == "my.yaml"
    assert [p.split(":")[0] for p in err.problems] == ["lora.r=0", "training.lr='fast'", "extra"]
    assert err.problems[2].startswith("extra: unknown key (value 1)")
    assert err.__cause__ is None and err.__suppress_context__


def test_spec_from_dict_source_defaults_to_job():
    with pytest.raises(JobSpecError) as info:
        spec_from_dict({"lora": {"r": 0}})
    assert info.value.source == "job"
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(3)
    assert info.value.source == "job"


def test_serve_section_alone():
    assert serve_spec_from_dict(None) == ServeSpec()
    assert serve_spec_from_dict({}) == ServeSpec()
    assert serve_spec_from_dict({"port": 9000}).port == 9000


def test_serve_section_problems_are_named_under_serve():
    with pytest.raises(JobSpecError) as info:
        serve_spec_from_dict({"port": 0, "max_batch_size": 32, "colour": "red"})
    err = info.value
    assert err.source == "serve" and err.exit_code == 2
    assert [p.split(":")[0] for p in err.problems] == [
        "serve.port=0",
        "serve.colour",
    ]
    with pytest.raises(JobSpecError) as info:
        serve_spec_from_dict({"max_ongoing_requests": 4}, source="cli")
    assert info.value.source == "cli"
    assert info.value.problems[0].startswith("serve.max_ongoing_requests=4: ")
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- relative paths -------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text("{}\n")
    (work / "model").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return work


def test_existing_relative_paths_become_absolute(workdir):
    assert _absolute("data/train.jsonl") == str(workdir / "data" / "train.jsonl")
    assert _absolute("./model") == str(workdir / "model")


def test_other_values_stay_as_given(workdir, tmp_path):
    assert _absolute("data/missing.jsonl") == "data/missing.jsonl"  # reported by the checks
    assert _absolute("org/model") == "org/model"  # a hub name
    assert _absolute(str(workdir / "model")) == str(workdir / "model")
    assert _absolute("s3://bucket/data/train.jsonl") == "s3://bucket/data/train.jsonl"
    assert _absolute("builtin:arithmetic") == "builtin:arithmetic"
    assert _absolute(3) == 3 and _absolute(None) is None
    (tmp_path / "home").mkdir()
    assert _absolute("~") == "~"  # home is absolute already: left for later expansion


def test_a_builtin_name_is_never_taken_for_a_path(workdir):
    (workdir / "builtin:arithmetic").mkdir()
    assert _absolute("builtin:arithmetic") == "builtin:arithmetic"


def test_a_uri_is_never_taken_for_a_path(workdir):
    (workdir / "s3:").mkdir()
    (workdir / "s3:" / "x").mkdir()
    assert _absolute("s3://x") == "s3://x"


def test_absolute_sources_fields_and_sweeps(workdir):
    assert LOCAL_SOURCE_FIELDS == ("model.name_or_path", "data.train", "data.eval")
    data = {
        "model": {"name_or_path": "model", "task": "causal_lm"},
        "data": {"train": "data/train.jsonl", "eval": "data/train.jsonl", "template": "model"},
        "training": {"lr": 0.1},
        "tune": {
            "metric": "eval_loss",
            "search": {
                "data.train": {"choice": ["data/train.jsonl", "builtin:arithmetic"]},
                "model.name_or_path": {"grid": ["model", "other"]},
                "data.template": {"choice": ["model"]},
                "data.eval": "not a distribution",
            },
        },
    }
    original = yaml.safe_dump(data)
    out = absolute_sources(data)
    train, model = str(workdir / "data" / "train.jsonl"), str(workdir / "model")
    assert out["model"] == {"name_or_path": model, "task": "causal_lm"}
    assert out["data"] == {"train": train, "eval": train, "template": "model"}
    assert out["training"] == {"lr": 0.1}
    assert out["tune"]["metric"] == "eval_loss"
    assert out["tune"]["search"] == {
        "data.train": {"choice": [train, "builtin:arithmetic"]},
        "model.name_or_path": {"grid": [model, "other"]},
        "data.template": {"choice": ["model"]},
        "data.eval": "not a distribution",
    }
    assert yaml.safe_dump(data) == original  # the input is not changed


def test_absolute_sources_leaves_odd_shapes_to_validation(workdir):
    assert absolute_sources({"model": "model", "data": None}) == {"model": "model", "data": None}
    assert absolute_sources({"data": {"split": "train"}}) == {"data": {"split": "train"}}
    assert absolute_sources({"tune": {"search": ["x"]}}) == {"tune": {"search": ["x"]}}
    assert absolute_sources({"tune": 3}) == {"tune": 3}
    dist = {"data.train": {"uniform": 3}}
    assert absolute_sources({"tune": {"search": dist}}) == {"tune": {"search": dist}}


# -- job files ------------------------------------------------------------------------------


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_job_reads_applies_overrides_and_resolves_paths(workdir):
    job = write(
        workdir / "job.yaml",
        "name: a\ndata: {train: data/train.jsonl}\ntraining: {lr: 0.1, epochs: 2}\n",
    )
    spec = load_job(job, ["training.lr=0.01", "data.eval=data/train.jsonl"])
    assert spec.name == "a"
    assert (spec.training.lr, spec.training.epochs) == (0.01, 2)
    assert spec.data.train == str(workdir / "data" / "train.jsonl")
    assert spec.data.eval == str(workdir / "data" / "train.jsonl")
    assert load_job(str(job)).training.lr == 0.1  # a str path; no overrides


def test_relative_paths_are_resolved_against_the_working_directory(workdir, tmp_path):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    job = write(jobs / "job.yaml", "data: {train: data/train.jsonl}\n")
    assert load_job(job).data.train == str(workdir / "data" / "train.jsonl")


def test_a_missing_job_file_is_a_path_error(tmp_path):
    with pytest.raises(PathError) as info:
        load_job(tmp_path / "none.yaml")
    err = info.value
    assert err.exit_code == 2
    assert (err.path, err.problem) == (str(tmp_path / "none.yaml"), "no such job file")


def test_a_directory_is_not_a_job_file(tmp_path):
    with pytest.raises(PathError) as info:
        load_job(tmp_path)
    assert (info.value.path, info.value.problem) == (
        str(tmp_path),
        "is a directory; give the job's YAML file",
    )


def test_a_file_that_is_not_utf8(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    err = info.value
    assert err.source == str(job) and len(err.problems) == 1
    assert err.problems[0].startswith("cannot read job file: ")
    assert "utf-8" in err.problems[0]
    assert err.__suppress_context__


def test_job_files_are_read_as_utf8_whatever_the_locale(tmp_path):
    import subprocess
    import sys

    from .conftest import REPO

    job = tmp_path / "job.yaml"
    job.write_bytes("# café: a comment\nname: cafe\n".encode())
    assert load_job(job).name == "cafe"
    code = "import sys; from raylm.job import load_job; print(load_job(sys.argv[1]).name)"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cafe"


def test_a_file_that_is_not_yaml(tmp_path):
    job = write(tmp_path / "job.yaml", "model: [unclosed\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert info.value.source == str(job) and len(info.value.problems) == 1
    assert info.value.problems[0].startswith("not valid YAML: ")
    assert "line" in info.value.problems[0]  # where YAML stopped
    assert info.value.__suppress_context__


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "null\n"])
def test_an_empty_file(tmp_path, text):
    job = write(tmp_path / "job.yaml", text)
    with pytest.raises(JobSpecError) as info:
        load_job(job)
    assert info.value.problems == ["the job file is empty"]
    assert info.value.source == str(job)


def test_bad_overrides_are_reported_before_the_job_is_validated(tmp_path):
    job = write(tmp_path / "job.yaml", "lora: {r: 0}\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job, ["lr", "a..b=1"])
    assert info.value.source == str(job)
    assert info.value.problems == [
        "override 'lr': expected dotted.key=value",
        "override 'a..b=1': expected dotted.key=value",
    ]


def test_a_job_file_that_is_not_a_mapping(tmp_path):
    job = write(tmp_path / "job.yaml", "- a\n- b\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job, ["a=1"])
    assert info.value.source == str(job)
    assert info.value.problems == ["(top level): expected a mapping of sections, got list"]


def test_every_bad_field_of_a_file_is_reported_with_the_file_as_source(tmp_path):
    job = write(tmp_path / "job.yaml", "lora: {r: 0}\ntraining: {lr: fast}\n")
    with pytest.raises(JobSpecError) as info:
        load_job(job, ["deepspeed.zero_stage=4"])
    err = info.value
    assert err.source == str(job)
    assert [p.split(":")[0] for p in err.problems] == [
        "lora.r=0",
        "training.lr='fast'",
        "deepspeed.zero_stage=4",
    ]


def test_overrides_merge_into_sections_and_fix_a_file(tmp_path):
    job = write(tmp_path / "job.yaml", "lora: {r: 0, alpha: 32}\n")
    spec = load_job(job, ["lora.r=4"])
    assert (spec.lora.r, spec.lora.alpha) == (4, 32)
    assert os.path.exists(job)
