"""raylm.tasks: the task and metric registries and the helpers every other module reads them
through (default formats, tasks from a model's architectures, sample requests and answers)."""

from __future__ import annotations

import json

import pytest

from raylm.serving.openai_api import (
    chat_body,
    chat_choice,
    classify_body,
    ner_body,
    parse_body,
)
from raylm.serving.openai_requests import (
    ChatRequest,
    LabelRequest,
)
from raylm.tasks import (
    DEFAULT_TASK,
    FORMATS,
    METRICS,
    TASK_NAMES,
    TASKS,
    format_metrics,
    task_for_format,
    task_from_architectures,
    tasks_reporting,
)

JSON = "application/json"


def test_metric_records_are_keyed_by_name_with_a_direction_and_a_usable_format():
    for name, metric in METRICS.items():
        assert metric.name == name
        assert metric.mode in ("min", "max")
        assert format(0.123456, metric.fmt)  # a valid format spec
    assert {n for n, m in METRICS.items() if m.mode == "min"} == {"loss", "eval_loss", "perplexity"}


def test_scores_are_the_plotted_headline_metrics_and_all_are_better_high():
    scores = {n for n, m in METRICS.items() if m.score}
    assert scores == {"exact_match", "accuracy", "macro_f1", "entity_f1"}
    assert all(METRICS[n].mode == "max" for n in scores)
    shown = {n for n, m in METRICS.items() if m.in_progress}
    assert shown == {"loss", "eval_loss"} | scores


def test_every_task_names_known_metrics_and_its_formats():
    assert TASK_NAMES == ("causal_lm", "sequence_classification", "token_classification")
    assert DEFAULT_TASK == "causal_lm" and DEFAULT_TASK in TASKS
    for name, task in TASKS.items():
        assert task.name == name
        assert set(task.metrics) <= set(METRICS)
        assert {"loss", "eval_loss"} <= set(task.metrics)
        assert task.formats and set(task.formats) <= set(FORMATS)
        assert task.labelled == (name != "causal_lm")
        assert bool(task.head_modules) == task.labelled
    assert FORMATS == ("instruction", "chat", "text", "classification", "ner")


def test_model_classes_and_peft_task_types_exist():
    import peft
    import transformers

    for task in TASKS.values():
        assert hasattr(transformers, task.auto_class), task.auto_class
        assert peft.TaskType[task.peft_task_type]
        if task.architecture_suffix:
            assert task.auto_class.endswith(task.architecture_suffix)


def test_evaluators_and_backends_load():
    from raylm.serving.engine import Engine
    from raylm.serving.predictor import Predictor
    from raylm.training import evaluate

    lm, clf, tagger = (TASKS[n] for n in TASK_NAMES)
    assert lm.evaluate_fn() is evaluate.evaluate_lm
    assert clf.evaluate_fn() is evaluate.evaluate_classifier
    assert tagger.evaluate_fn() is evaluate.evaluate_tagger
    assert lm.backend_cls() is Engine
    assert clf.backend_cls() is Predictor and tagger.backend_cls() is Predictor


def test_routes():
    assert TASKS["causal_lm"].routes == ("/v1/chat/completions", "/v1/completions")
    assert TASKS["sequence_classification"].routes == ("/v1/classify",)
    assert TASKS["token_classification"].routes == ("/v1/ner",)


def test_chat_sample_request_is_a_valid_greedy_chat_body_and_its_answer_is_read_back():
    task = TASKS["causal_lm"]
    body = task.sample_request("my-model", task.sample)
    req = parse_body(json.dumps(body).encode(), JSON, ChatRequest)
    assert req.model == "my-model"
    assert [(m.role, m.content) for m in req.messages] == [("user", "Hello!")]
    assert req.temperature == 0
    assert req.max_tokens == 16
    answer = chat_body("my-model", [chat_choice(0, "Hi there", "stop")], 3, 2)
    assert task.answer_text(answer) == "Hi there"


@pytest.mark.parametrize("name", ["sequence_classification", "token_classification"])
def test_label_sample_request_is_a_valid_label_body(name):
    task = TASKS[name]
    body = task.sample_request("clf", task.sample)
    assert body == {"model": "clf", "input": task.sample}
    req = parse_body(json.dumps(body).encode(), JSON, LabelRequest)
    assert req.texts() == [task.sample]


def test_label_answer_is_the_first_texts_label_and_score():
    body = classify_body(
        "clf",
        [
            {"label": "positive", "score": 0.9172, "scores": {"positive": 0.9172}},
            {"label": "negative", "score": 0.5, "scores": {}},
        ],
        7,
    )
    assert TASKS["sequence_classification"].answer_text(body) == "positive (0.92)"


def test_entities_answer_lists_the_first_texts_entities():
    ents = [
        {"entity": "PER", "text": "Maria Garcia", "start": 0, "end": 12, "score": 0.9},
        {"entity": "LOC", "text": "Paris", "start": 23, "end": 28, "score": 0.8},
    ]
    answer = TASKS["token_classification"].answer_text
    assert answer(ner_body("t", [ents, []], 5)) == "PER 'Maria Garcia', LOC 'Paris'"
    assert answer(ner_body("t", [[], ents], 5)) == "(no entities)"


def test_a_format_names_the_task_it_is_the_default_of():
    assert task_for_format("classification") is TASKS["sequence_classification"]
    assert task_for_format("ner") is TASKS["token_classification"]
    assert task_for_format("instruction") is TASKS["causal_lm"]
    assert task_for_format("chat") is None  # causal_lm reads it, but not by default
    assert task_for_format("nope") is None


@pytest.mark.parametrize(
    "architectures, task",
    [
        (["LlamaForCausalLM"], "causal_lm"),
        (["BertForSequenceClassification"], "sequence_classification"),
        (["BertForTokenClassification"], "token_classification"),
        (["BertModel", "BertForTokenClassification"], "token_classification"),
        (["BertForTokenClassification", "BertForSequenceClassification"], "token_classification"),
        (
            ["BertForSequenceClassification", "BertForTokenClassification"],
            "sequence_classification",
        ),
        ([], "causal_lm"),
    ],
)
def test_task_from_architectures(architectures, task):
    assert task_from_architectures(architectures) == task


def test_tasks_reporting():
    assert tasks_reporting("accuracy") == ["sequence_classification"]
    assert tasks_reporting("entity_f1") == ["token_classification"]
    assert tasks_reporting("eval_loss") == list(TASK_NAMES)
    assert tasks_reporting("bleu") == []


def test_format_metrics_in_registry_order_floats_to_four_significant_digits():
    metrics = {"eval_loss": 0.123456, "step": 7, "loss": 2.0, "accuracy": 1, "other": 9.0}
    assert format_metrics(metrics) == "step=7, loss=2, eval_loss=0.1235, accuracy=1"
    assert format_metrics({"a": 1.23456, "b": "x"}, keys=("b", "a", "c")) == "b=x, a=1.235"
    assert format_metrics({}) == ""
