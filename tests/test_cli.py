"""The command line without Ray: overrides anywhere after the command, bad paths answered with
exit 2 and one line naming the path, bad settings and missing keys refused before any Ray work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from raylm.cli import parse_args

from .conftest import REPO, cli_no_ray, tiny_job


@pytest.mark.parametrize(
    ("argv", "overrides", "flags"),
    [
        (["train", "j.yaml", "a=1", "--address", "x:1", "b=2"], ["a=1", "b=2"], {"address": "x:1"}),
        (["train", "j.yaml", "--address", "x:1", "a=1"], ["a=1"], {"address": "x:1"}),
        (["tune", "j.yaml", "--resume", "a.b=3"], ["a.b=3"], {"resume": True}),
        (
            ["run", "j.yaml", "x=1", "--force", "y=2", "--serve-for", "0", "z=3"],
            ["x=1", "y=2", "z=3"],
            {"force": True, "serve_for": 0.0},
        ),
        (["validate", "j.yaml", "training.lr=1e-4"], ["training.lr=1e-4"], {}),
        (
            ["submit", "j.yaml", "--no-wait", "name=other", "--pip", "six"],
            ["name=other"],
            {"no_wait": True, "pip": ["six"]},
        ),
        (
            ["serve", "ckpt", "--detach", "serve.api_key_env=KEY"],
            ["serve.api_key_env=KEY"],
            {"detach": True},
        ),
        (
            ["serve", "ckpt", "serve.port=8001", "--adapter", "a=dir", "serve.num_cpus=1"],
            ["serve.port=8001", "serve.num_cpus=1"],
            {"adapter": ["a=dir"]},
        ),
    ],
)
def test_overrides_are_accepted_anywhere_after_the_command(argv, overrides, flags):
    args = parse_args(argv)
    assert args.overrides == overrides
    for key, value in flags.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "j.yaml", "--bogus"],
        ["train", "j.yaml", "--address", "x", "stray"],  # not key=value
        ["export", "ckpt", "out", "a=1"],  # export takes no overrides
        ["run", "j.yaml", "--force", "-x=1"],
    ],
)
def test_anything_else_after_the_command_is_still_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# -- bad paths, per command -----------------------------------------------------------------------

DRIVER = r"""
import contextlib, io, json, sys
from raylm.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    out.append([argv, rc, err.getvalue()])
print(json.dumps({"results": out, "ray_imported": "ray" in sys.modules}))
"""


def _bad_dirs(root) -> dict[str, tuple[str, str]]:
    """Each kind of bad model path → (path, the words its message must contain)."""
    from raylm.models import materialize_tiny_llama

    good = materialize_tiny_llama()
    kinds = {}
    kinds["missing"] = (str(root / "nowhere"), "no such")
    (root / "a-file.safetensors").write_bytes(b"not a directory")
    kinds["file"] = (str(root / "a-file.safetensors"), "is a file")
    (root / "empty").mkdir()
    kinds["empty"] = (str(root / "empty"), "empty directory")
    half = root / "half"
    half.mkdir()
    for name in ("config.json", "model.safetensors"):
        (half / name).write_bytes((good / name).read_bytes())
    (half / "raylm.json").write_text(json.dumps({"format": "raylm-checkpoint/1"}))
    kinds["half-written"] = (str(half), "half-written")
    bare = root / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((good / "config.json").read_bytes())
    kinds["no weights"] = (str(bare), "no weights")
    return kinds


def test_every_command_answers_a_bad_path_with_exit_2_and_one_line_before_any_ray_work(tmp_path):
    from raylm.models import materialize_tiny_llama

    kinds = _bad_dirs(tmp_path)
    job_dir = tmp_path / "a-directory.yaml"
    job_dir.mkdir()
    cases = []  # (argv, path, words)
    for command in ("validate", "train", "tune", "run", "submit"):
        cases.append(
            (
                [command, str(tmp_path / "missing.yaml")],
                str(tmp_path / "missing.yaml"),
                "no such job file",
            )
        )
        cases.append(([command, str(job_dir)], str(job_dir), "is a directory"))
    for kind, (path, words) in kinds.items():
        if kind != "file":  # a file TARGET is read as a job file
            cases.append((["serve", path], path, words))
        cases.append((["export", path, str(tmp_path / f"out-{kind}")], path, words))
        adapter = ["serve", str(materialize_tiny_llama()), "--adapter", f"extra={path}"]
        cases.append((adapter, path, words))
    out_file = kinds["file"][0]
    cases.append((["export", str(materialize_tiny_llama()), out_file], out_file, "is a file"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases.append((["export", str(materialize_tiny_llama()), str(full)], str(full), "not empty"))

    argvs = [argv for argv, _, _ in cases]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = []
    for (argv, path, words), (_, rc, err) in zip(cases, report["results"], strict=True):
        lines = err.strip().splitlines()
        ok = (
            rc == 2
            and len(lines) == 1
            and path in lines[0]
            and words in lines[0]
            and "Traceback" not in err
        )
        if not ok:
            wrong.append((argv, rc, err[-400:]))
    assert not wrong, wrong
    assert report["ray_imported"] is False
    print(f"bad paths: {len(cases)} command lines, all exit 2 with one line")


# -- settings and keys refused before Ray ----------------------------------------------------


def test_serve_refuses_bad_settings_and_a_missing_key_before_any_ray_work():
    from raylm.models import materialize_tiny_llama

    target = str(materialize_tiny_llama())
    bad = cli_no_ray("serve", target, "serve.port=0", "serve.max_batch_size=32", "training.lr=1")
    assert bad.returncode == 2
    assert "training.*: only serve.* settings apply" in bad.stderr
    assert bad.stdout.strip().endswith("NO_RAY")
    bad = cli_no_ray("serve", target, "serve.port=0", "serve.autoscaling.max_replica=3")
    assert bad.returncode == 2
    assert (
        "serve.port=0" in bad.stderr and "serve.autoscaling.max_replica: unknown key" in bad.stderr
    )
    assert bad.stdout.strip().endswith("NO_RAY")
    env = {k: v for k, v in os.environ.items() if k != "RAYLM_UNSET_KEY_VAR"}
    # the override may come after a flag
    nokey = cli_no_ray(
        "serve", target, "--detach", "serve.api_key_env=RAYLM_UNSET_KEY_VAR", env=env
    )
    assert nokey.returncode == 2 and "RAYLM_UNSET_KEY_VAR" in nokey.stderr
    assert nokey.stdout.strip().endswith("NO_RAY")


def test_run_refuses_a_job_whose_api_key_variable_is_empty_before_any_ray_work(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, serve={"api_key_env": "RAYLM_EMPTY_KEY"})))
    env = {**os.environ, "RAYLM_EMPTY_KEY": ""}
    out = cli_no_ray("run", str(job), env=env)
    assert out.returncode == 2, out.stderr
    assert "RAYLM_EMPTY_KEY" in out.stderr and "unset or empty" in out.stderr
    assert out.stdout.strip().endswith("NO_RAY")
    assert not (tmp_path / "runs").exists()  # nothing trained
    # --no-serve needs no key
    assert "RAYLM_EMPTY_KEY" not in cli_no_ray("validate", str(job), env=env).stderr
