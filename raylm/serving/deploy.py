"""`raylm serve`: decide what to serve (a checkpoint, an export, or a job's promoted winner with its
top-k trial adapters), start the Serve app on the Ray cluster, ask it the sample request, stop it.

The app itself lives in `raylm.serving.gateway` (HTTP) and `raylm.serving.replica` (models).
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raylm.builtins import ARITHMETIC
from raylm.checkpoint import (
    best_run_checkpoint,
    check_checkpoint,
    inference_metadata,
    manifest_path,
    model_dir_problem,
    read_manifest,
    refuse_pickles,
    require_model_dir,
    run_uri,
    task_of,
)
from raylm.errors import InputError, JobSpecError, NotReady, PathError
from raylm.job import JobSpec, ServeSpec, load_job, parse_overrides, serve_spec_from_dict
from raylm.job.tree import deep_merge
from raylm.serving.auth import key_digest
from raylm.storage import local_dir
from raylm.tasks import TASKS

APP_NAME = "raylm"
# What `raylm run` asks a model trained on builtin:arithmetic (its task's sample otherwise).
ARITHMETIC_SAMPLE = "12+7"


@dataclass
class ServePlan:
    """What one `raylm serve` deploys: (name, checkpoint dir) pairs (first = default model)."""

    models: list[tuple[str, str]]
    spec: ServeSpec
    sample: str = "Hello!"
    notes: list[str] = field(default_factory=list)
    task: str = "causal_lm"
    sample_system: str | None = None  # a chat job's system turn, sent before `sample`


def _is_lora(path: str) -> bool:
    return Path(path, "adapter_config.json").exists()


def _job_models(spec: JobSpec) -> tuple[list[tuple[str, str]], list[str]]:
    serve_spec = spec.serve or ServeSpec()
    notes: list[str] = []
    try:
        manifest = read_manifest(spec)
    except FileNotFoundError:
        manifest = None
    if manifest is not None:
        # Checkpoints on cloud storage are fetched once into a local cache for the replicas.
        models = [(spec.name, local_dir(manifest["checkpoint"]))]
        notes.append(
            f"{spec.name}: promoted trial {manifest['trial_id']} "
            f"({manifest['metric']}={manifest[manifest['metric']]:.4g})"
        )
        if serve_spec.multi_lora and _is_lora(models[0][1]):
            for entry in manifest.get("top_k", []):
                path = local_dir(entry["checkpoint"])
                if _is_lora(path):
                    models.append((f"{spec.name}-{entry['trial_id']}", path))
        return models, notes
    best = best_run_checkpoint(spec)
    if best is None:
        raise NotReady(
            f"job {spec.name!r} has no promoted sweep winner ({manifest_path(spec)}) and no "
            f"training checkpoint under {run_uri(spec)}: run `raylm tune` or `raylm train` first"
        )
    notes.append(f"{spec.name}: best training checkpoint by {spec.checkpoint.metric}")
    return [(spec.name, local_dir(best))], notes


def _finish(
    models: list[tuple[str, str]],
    serve_spec: ServeSpec,
    notes: list[str],
    adapters: Sequence[str],
    name: str | None,
    source: str,
) -> ServePlan:
    if name:
        models[0] = (name, models[0][1])
    for item in adapters:
        adapter_name, sep, adapter_dir = item.partition("=")
        if not sep or not adapter_name or not adapter_dir:
            raise InputError(f"--adapter {item!r}: expected NAME=DIR")
        problem = model_dir_problem(adapter_dir)
        if problem:
            raise PathError(adapter_dir, f"{problem} (--adapter {adapter_name})")
        models.append((adapter_name, str(Path(adapter_dir).resolve())))
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise JobSpecError([f"model names must be unique: {names}"], source)
    for _, directory in models:  # refuse here, before any Ray work, not in a replica
        refuse_pickles(directory)
        check_checkpoint(directory)
    tasks = {task_of(d) for _, d in models}
    if len(tasks) != 1:
        raise JobSpecError(
            [f"the served models mix tasks {sorted(tasks)}; serve one task per app"], source
        )
    task = tasks.pop()
    meta = inference_metadata(models[0][1])
    sample, system = TASKS[task].sample, None
    data = meta.get("spec", {}).get("data", {})
    if data.get("train") == ARITHMETIC:
        sample = ARITHMETIC_SAMPLE
    elif data.get("format") == "chat":
        sample, system = held_out_chat_sample(data.get("eval"), sample)
    return ServePlan(models, serve_spec, sample, notes, task, system)


def held_out_chat_sample(eval_path: str | None, default: str) -> tuple[str, str | None]:
    """A chat job's first held-out question (and its system turn) as the sample `raylm run` asks,
    so the answer shows what was learned; `default` where the eval file is not here (a job
    trained elsewhere) or has no such row."""
    try:
        with open(str(eval_path)) as f:
            messages = json.loads(f.readline())["messages"]
    except (OSError, ValueError, KeyError, TypeError):
        return default, None
    users = [m["content"] for m in messages if m.get("role") == "user"]
    systems = [m["content"] for m in messages if m.get("role") == "system"]
    return (users[0], systems[0] if systems else None) if users else (default, None)


def plan_for_job(spec: JobSpec, adapters: Sequence[str] = (), name: str | None = None) -> ServePlan:
    """The ServePlan of a job: its promoted sweep winner (+ top-k adapters) or best checkpoint.

    Raises NotReady when the job has neither.
    """
    models, notes = _job_models(spec)
    return _finish(models, spec.serve or ServeSpec(), notes, adapters, name, spec.name)


def resolve_target(
    target: str,
    overrides: Sequence[str] = (),
    adapters: Sequence[str] = (),
    name: str | None = None,
) -> ServePlan:
    """Turns a TARGET (job file, checkpoint dir, export dir) into a ServePlan.

    `overrides` are `serve.key=value` settings; `adapters` are extra `NAME=DIR` LoRA checkpoints.
    Raises JobSpecError for bad settings, PathError for a target that cannot be served,
    NotReady when a job has nothing to serve yet.
    """
    path = Path(target)
    if path.is_file():
        return plan_for_job(load_job(target, list(overrides)), adapters, name)
    if not path.exists():
        raise PathError(target, "no such job file, checkpoint or model directory")
    require_model_dir(path)
    meta = inference_metadata(path)
    tree, problems = parse_overrides(list(overrides))
    problems += [
        f"override {k}.*: only serve.* settings apply to a checkpoint" for k in tree if k != "serve"
    ]
    if problems:
        raise JobSpecError(problems, target)
    trained = meta.get("spec", {})
    serve_spec = serve_spec_from_dict(
        deep_merge(trained.get("serve") or {}, tree.get("serve", {})), target
    )
    models = [(trained.get("name") or path.resolve().name, str(path.resolve()))]
    return _finish(models, serve_spec, [], adapters, name, target)


def api_key_digest(spec: ServeSpec) -> str | None:
    """Digest of the API key named by `api_key_env` (None when auth is off).

    Raises NotReady when the job asks for a key but the variable is unset or empty, so a
    server never starts open by accident.
    """
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env, "")
    if not key:
        raise NotReady(
            f"serve.api_key_env is {spec.api_key_env!r} but that environment variable "
            f"is unset or empty; export it or remove api_key_env"
        )
    return key_digest(key)


def base_url(spec: ServeSpec) -> str:
    """The URL clients use (a wildcard bind is reached through 127.0.0.1 locally)."""
    host = "127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host
    return f"http://{host}:{spec.port}"


def wait_http(url: str, timeout_s: float) -> None:
    """Polls `url` until it answers 200; raises TimeoutError naming the URL otherwise."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(
        f"{url} did not answer within {timeout_s:.0f}s ({last}); if Serve was already "
        f"running on another port, run `raylm shutdown` first"
    )


def start(plan: ServePlan, wait_s: float = 60.0) -> str:
    """Deploys the plan as Serve app `raylm` (replacing a previous one); returns its base URL.

    Needs Ray initialised. Raises NotReady for a missing API key, TimeoutError if the HTTP
    endpoint does not come up.
    """
    from ray import serve

    from raylm.serving.gateway import build_app

    s = plan.spec
    digest = api_key_digest(s)
    serve.start(proxy_location=s.proxy_location, http_options={"host": s.host, "port": s.port})
    serve.run(build_app(plan.models, s, digest), name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(s)
    wait_http(url + "/health", wait_s)
    return url


def _sample_body(plan: ServePlan) -> str:
    body = TASKS[plan.task].sample_request(plan.models[0][0], plan.sample)
    if plan.sample_system and "messages" in body:
        body["messages"].insert(0, {"role": "system", "content": plan.sample_system})
    if "max_tokens" in body:  # room for a whole answer, within what the server allows
        body["max_tokens"] = min(48, plan.spec.max_new_tokens)
    return json.dumps(body)


def curl_line(plan: ServePlan, url: str) -> str:
    """A ready-to-paste request against the served default model."""
    body = _sample_body(plan)
    auth = f' -H "Authorization: Bearer ${plan.spec.api_key_env}"' if plan.spec.api_key_env else ""
    route = TASKS[plan.task].routes[0]
    return f"curl {url}{route} -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


def shutdown() -> bool:
    """Deletes the `raylm` Serve app (and Serve, if nothing else runs); returns whether it
    existed."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve not running on this cluster
        return False
    if APP_NAME not in apps:
        return False
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
    return True


def ask(plan: ServePlan, url: str, timeout_s: float = 120.0) -> str:
    """Sends the plan's sample request to the served default model; returns the answer as text
    (the reply, the label and its score, or the entities found)."""
    body = _sample_body(plan).encode()
    headers = {"Content-Type": "application/json"}
    if plan.spec.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ.get(plan.spec.api_key_env, '')}"
    req = urllib.request.Request(
        url + TASKS[plan.task].routes[0], data=body, headers=headers, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return TASKS[plan.task].answer_text(json.loads(resp.read()))
