"""The task registry: what each task is, in one frozen record, read by every other module.

A task names the data formats it reads, the metrics its runs report, the transformers Auto class
and peft task type of its model, its HTTP routes and sample request, and where its eval scorer
and its serving backend live. Adding a task means adding one record here and the functions it
names (peft's per-method registry is the model). Metrics have their own registry: which way is
better, how progress prints them, whether they are 0–1 scores.

Pure Python: the job file, the CLI and the reports read it without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Metric:
    """A metric a training run can report."""

    name: str
    mode: Literal["min", "max"]  # which way is better
    fmt: str  # how progress lines and summaries print it
    in_progress: bool  # shown on the live progress line
    score: bool  # a 0–1 score, plotted beside the loss curves


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("loss", "min", ".4f", True, False),
        Metric("eval_loss", "min", ".4f", True, False),
        Metric("perplexity", "min", ".4g", False, False),
        Metric("exact_match", "max", ".3f", True, True),
        Metric("exact_match_normalized", "max", ".3f", False, False),
        Metric("accuracy", "max", ".3f", True, True),
        Metric("macro_f1", "max", ".3f", True, True),
        Metric("entity_precision", "max", ".3f", False, False),
        Metric("entity_recall", "max", ".3f", False, False),
        Metric("entity_f1", "max", ".3f", True, True),
    )
}


def _chat_request(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
        "temperature": 0,
    }


def _chat_answer(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


def _input_request(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "input": text}


def _label_answer(body: dict[str, Any]) -> str:
    first = body["data"][0]
    return f"{first['label']} ({first['score']:.2f})"


def _entities_answer(body: dict[str, Any]) -> str:
    found = body["data"][0]["entities"]
    return ", ".join(f"{e['entity']} {e['text']!r}" for e in found) or "(no entities)"


@dataclass(frozen=True)
class Task:
    """One task: everything the job file, training, evaluation and serving need to know."""

    name: str
    formats: tuple[str, ...]  # data formats it reads; the first is the default
    metrics: tuple[str, ...]  # what its runs report (names in METRICS)
    auto_class: str  # the transformers AutoModelFor… class (head included)
    peft_task_type: str  # peft TaskType member
    labelled: bool  # a classifier: its head is sized to label names
    head_modules: tuple[str, ...]  # a new head: trained fully beside LoRA, saved with it
    architecture_suffix: str | None  # config.json `architectures` ending → this task
    routes: tuple[str, ...]  # HTTP routes serving it; the first gets the sample request
    sample: str  # the sample input `raylm run` sends
    sample_request: Callable[[str, str], dict[str, Any]]  # (model, text) → request body
    answer_text: Callable[[dict[str, Any]], str]  # response body → the answer as text
    evaluator: str  # "module:function" scoring an eval set inside training
    backend: str  # "module:Class" a Serve replica loads to answer the routes

    def evaluate_fn(self) -> Callable[..., dict[str, float]]:
        """The eval scorer (imported on first use: it needs torch)."""
        return _load(self.evaluator)

    def backend_cls(self) -> Any:
        """The serving backend class (imported on first use: it needs torch)."""
        return _load(self.backend)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="causal_lm",
            formats=("instruction", "chat", "text"),
            metrics=("loss", "eval_loss", "perplexity", "exact_match", "exact_match_normalized"),
            auto_class="AutoModelForCausalLM",
            peft_task_type="CAUSAL_LM",
            labelled=False,
            head_modules=(),
            architecture_suffix=None,
            routes=("/v1/chat/completions", "/v1/completions"),
            sample="Hello!",
            sample_request=_chat_request,
            answer_text=_chat_answer,
            evaluator="raylm.training.evaluate:evaluate_lm",
            backend="raylm.serving.engine:Engine",
        ),
        Task(
            name="sequence_classification",
            formats=("classification",),
            metrics=("loss", "eval_loss", "accuracy", "macro_f1"),
            auto_class="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
            labelled=True,
            head_modules=("classifier", "score"),
            architecture_suffix="ForSequenceClassification",
            routes=("/v1/classify",),
            sample="What a wonderful film, I would watch it again.",
            sample_request=_input_request,
            answer_text=_label_answer,
            evaluator="raylm.training.evaluate:evaluate_classifier",
            backend="raylm.serving.predictor:Predictor",
        ),
        Task(
            name="token_classification",
            formats=("ner",),
            metrics=("loss", "eval_loss", "entity_precision", "entity_recall", "entity_f1"),
            auto_class="AutoModelForTokenClassification",
            peft_task_type="TOKEN_CLS",
            labelled=True,
            head_modules=("classifier", "score"),
            architecture_suffix="ForTokenClassification",
            routes=("/v1/ner",),
            sample="Maria Garcia flew from Paris to meet the United Nations .",
            sample_request=_input_request,
            answer_text=_entities_answer,
            evaluator="raylm.training.evaluate:evaluate_tagger",
            backend="raylm.serving.predictor:Predictor",
        ),
    )
}
TASK_NAMES = tuple(TASKS)
DEFAULT_TASK = "causal_lm"
# Every data format some task reads, in registry order.
FORMATS = tuple(dict.fromkeys(f for t in TASKS.values() for f in t.formats))


def task_for_format(fmt: str) -> Task | None:
    """The task whose default format is `fmt` (a classifier job may leave `data.format` out)."""
    return next((t for t in TASKS.values() if t.formats[0] == fmt), None)


def task_from_architectures(architectures: list[str]) -> str:
    """The task a plain HF model directory was saved for, from its config's `architectures`."""
    for arch in architectures:
        for t in TASKS.values():
            if t.architecture_suffix and arch.endswith(t.architecture_suffix):
                return t.name
    return DEFAULT_TASK


def tasks_reporting(metric: str) -> list[str]:
    """The tasks whose runs report `metric`."""
    return [t.name for t in TASKS.values() if metric in t.metrics]


def format_metrics(metrics: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    """`step=…, loss=…, eval_loss=…` for the registry's metrics a dict holds (in registry order)."""
    names = ("step", *METRICS) if keys is None else keys
    return ", ".join(
        f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
        for k in names
        if k in metrics
    )
