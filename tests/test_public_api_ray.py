"""The README's Python API snippet, run as written (with a short job in place of the
quickstart) after every raylm submodule has been imported, on the test session's Ray."""

from __future__ import annotations

import importlib
import os
import pkgutil
import urllib.request

import pytest
import yaml

import raylm

from .conftest import REPO, tiny_job
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


def readme_snippet() -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Python API") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_api_snippet_runs_in_order(ray_cluster, tmp_path):
    for module in pkgutil.walk_packages(raylm.__path__, "raylm."):
        if not module.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(module.name)  # what once turned raylm.serve into a module
    port = free_port()
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            tiny_job(
                tmp_path,
                name="api",
                scaling={"num_workers": 1, "cpus_per_worker": 1},
                training={"max_steps": 10, "eval_every": 10},
                serve={"port": port, "num_cpus": 0.5, "promote_if": {"eval_loss": {"max": 50.0}}},
            )
        )
    )
    code = readme_snippet()
    assert '"jobs/quickstart.yaml"' in code and '["serve.port=8000"]' in code
    code = code.replace('"jobs/quickstart.yaml"', repr(str(job)))
    code = code.replace('["serve.port=8000"]', repr([f"serve.port={port}"]))
    calls = [
        line.split("(")[0].split("=")[-1].strip() for line in code.splitlines() if "raylm." in line
    ]
    assert calls == [
        "raylm.load_job",
        "raylm.run",
        "raylm.shutdown",
        "raylm.run",
        "raylm.train",
        "raylm.serve",
        "raylm.shutdown",
    ]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].winner.reused and scope["result"].url is None  # the serve=False re-run
    assert scope["url"] == f"http://127.0.0.1:{port}"
    assert scope["plan"].models[0][0] == "api"
    with pytest.raises(OSError):  # the last shutdown stopped it
        urllib.request.urlopen(scope["url"] + "/health", timeout=5)
