"""The seed tasks end to end on the packaged all-MiniLM-L6-v2 encoder, with the shipped job files
and data: LoRA fine-tuning under Ray Train + DeepSpeed lifts sentiment accuracy and NER entity F1
far above the untrained head's; a 4-trial lr × rank sweep picks a classifier; `/v1/classify` and
`/v1/ner` answer over real HTTP exactly as the same checkpoints do in process."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from raylm.job import load_job
from raylm.metrics import bio_spans, entity_scores

from .conftest import REPO
from .test_serve_ray import free_port

pytestmark = pytest.mark.ray


def shipped(name: str, tmp, *overrides: str):
    """A job file from jobs/ (its data paths are relative to the repository root)."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return load_job(
            f"jobs/{name}.yaml",
            [f"storage_path={tmp}", f"serve.port={free_port()}", "serve.num_cpus=0.5", *overrides],
        )
    finally:
        os.chdir(cwd)


def rows(name: str, split: str = "eval") -> list[dict]:
    return [json.loads(line) for line in open(f"{REPO}/jobs/data/{name}/{split}.jsonl")]


def post(url: str, body: dict | bytes, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def sentiment(ray_cluster, tmp_path_factory):
    from raylm.training.trainer import run_train

    spec = shipped("sentiment-minilm", tmp_path_factory.mktemp("sentiment"))
    return spec, run_train(spec)


@pytest.fixture(scope="module")
def ner(ray_cluster, tmp_path_factory):
    from raylm.training.trainer import run_train

    spec = shipped("ner-minilm", tmp_path_factory.mktemp("ner"))
    return spec, run_train(spec)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    from raylm.tuning.sweep import run_sweep

    # One worker per trial so two trials share the 2 cores; two epochs are enough to rank them.
    spec = shipped(
        "sentiment-minilm",
        tmp_path_factory.mktemp("sweep"),
        "name=sentiment-sweep",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.9",
        "training.epochs=2",
    )
    return spec, run_sweep(spec)


def test_lora_on_minilm_lifts_sentiment_accuracy_far_above_the_untrained_head(sentiment):
    spec, result = sentiment
    before, after = result.history[0]["accuracy"], result.best_metrics["accuracy"]
    print(
        f"\nsentiment eval accuracy: untrained head {before:.3f} → fine-tuned {after:.3f} "
        f"(macro-F1 {result.history[0]['macro_f1']:.3f} → {result.best_metrics['macro_f1']:.3f}) "
        f"after {result.history[-1]['step']} steps"
    )
    assert after >= 0.85 and after - before >= 0.25
    meta = json.load(open(os.path.join(result.best_checkpoint, "raylm.json")))
    assert meta["labels"] == ["negative", "positive"] and meta["task"] == "sequence_classification"
    assert os.path.exists(os.path.join(result.run_dir, "loss_curve.png"))


def test_exported_classifier_loads_alone_in_transformers_and_scores_the_same(sentiment, tmp_path):
    """`raylm export` merges the adapter and the trained head; plain transformers then gets
    the training-time accuracy on the eval set, label names included."""
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec, result = sentiment
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "export", result.best_checkpoint, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "AutoModelForSequenceClassification.from_pretrained" in done.stdout
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    evals = rows("sentiment")
    with torch.no_grad():
        ids = model(
            **tok([r["text"] for r in evals], return_tensors="pt", padding=True)
        ).logits.argmax(-1)
    labels = [model.config.id2label[int(i)] for i in ids]
    accuracy = sum(p == r["label"] for p, r in zip(labels, evals, strict=True)) / len(evals)
    assert accuracy == pytest.approx(result.best_metrics["accuracy"], abs=0.011)


def test_ner_fine_tuning_lifts_entity_f1_far_above_the_untrained_model(ner):
    spec, result = ner
    before, after = result.history[0]["entity_f1"], result.best_metrics["entity_f1"]
    print(
        f"\nNER eval entity F1: untrained {before:.3f} → fine-tuned {after:.3f} "
        f"(P {result.best_metrics['entity_precision']:.3f}, "
        f"R {result.best_metrics['entity_recall']:.3f}) "
        f"after {result.history[-1]['step']} steps"
    )
    assert after >= 0.8 and after - before >= 0.5
    meta = json.load(open(os.path.join(result.best_checkpoint, "raylm.json")))
    assert meta["labels"][0] == "O" and {"B-PER", "I-PER", "B-LOC", "B-ORG", "B-MISC"} <= set(
        meta["labels"]
    )


def test_four_trial_lr_by_rank_sweep_promotes_the_most_accurate_classifier(sweep):
    from raylm.tuning.sweep import sweep_dir

    from .test_tune_ray import trial_checkpoints

    spec, result = sweep
    trials = result.rows
    grid = {(lr, r) for lr in (2e-4, 1e-3) for r in (4, 16)}
    assert {(t["training.lr"], t["lora.r"]) for t in trials} == grid
    # The best accuracy over every trial's own checkpoints on disk, not run_sweep's rows.
    on_disk = trial_checkpoints(sweep_dir(spec))
    assert len({t for t, _ in on_disk}) == 4
    assert all(0.0 <= m["metrics"]["accuracy"] <= 1.0 for _, m in on_disk)
    best = max(m["metrics"]["accuracy"] for _, m in on_disk)
    manifest = result.manifest
    assert manifest["accuracy"] == pytest.approx(best) and manifest["mode"] == "max"
    assert manifest["accuracy"] >= 0.85
    promoted = json.load(open(os.path.join(manifest["checkpoint"], "raylm.json")))
    assert promoted["metrics"]["accuracy"] == pytest.approx(best)
    trained = promoted["spec"]  # the manifest's config is what the promoted trial trained with
    assert manifest["config"] == {
        "training.lr": trained["training"]["lr"],
        "lora.r": trained["lora"]["r"],
    }
    print(
        "\n"
        + "\n".join(
            f"trial lr={t['training.lr']:g} r={t['lora.r']}: accuracy "
            f"{t['accuracy']:.3f} ({t['status']} at step {t['step']})"
            for t in trials
        )
    )


def test_classify_over_http_matches_in_process_predictions(sweep):
    """The sweep's winner and its top-k trial adapters (each with its own trained head) served
    together; HTTP answers equal an in-process Predictor's for every eval text and model."""
    from raylm.serving.deploy import plan_for_job, shutdown, start
    from raylm.serving.predictor import Predictor

    spec, result = sweep
    plan = plan_for_job(spec)
    assert plan.task == "sequence_classification" and len(plan.models) == 1 + spec.tune.top_k
    url = start(plan)
    try:
        local = Predictor(plan.models)
        texts = [r["text"] for r in rows("sentiment")]
        names = [n for n, _ in plan.models]
        # 16 clients: every model gets the eval set in chunks of 10, plus single texts, all at once.
        jobs = [(name, texts[i : i + 10]) for name in names for i in range(0, len(texts), 10)]
        jobs += [(name, texts[i]) for i, name in enumerate(names * 8)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda j: post(url + "/v1/classify", {"model": j[0], "input": j[1]}), jobs)
            )
        assert all(status == 200 for status, _ in answers), [b for s, b in answers if s != 200][:2]
        for (model, inp), (_, body) in zip(jobs, answers, strict=True):
            batch = [inp] if isinstance(inp, str) else inp
            want = local.classify([(model, t) for t in batch])
            assert body["model"] == model and [d["index"] for d in body["data"]] == list(
                range(len(batch))
            )
            for got, exp in zip(body["data"], want, strict=True):
                assert got["label"] == exp.label
                assert got["score"] == pytest.approx(exp.score, abs=1e-4)
                assert set(got["scores"]) == {"negative", "positive"}
        # Each model is its own trial's adapter and head: scored over HTTP, each reproduces the
        # accuracy its trial measured (the trials differ, so a mixed-up adapter would show).
        measured = {spec.name: result.manifest["accuracy"]}
        measured.update(
            {f"{spec.name}-{e['trial_id']}": e["accuracy"] for e in result.manifest["top_k"]}
        )
        per_model = len(texts) // 10
        for k, name in enumerate(names):
            predicted = [
                d["label"]
                for _, body in answers[k * per_model : (k + 1) * per_model]
                for d in body["data"]
            ]
            accuracy = sum(
                p == r["label"] for p, r in zip(predicted, rows("sentiment"), strict=True)
            ) / len(texts)
            print(
                f"\n/v1/classify model {name}: accuracy on the eval set {accuracy:.3f}; its trial "
                f"measured {measured[name]:.3f}"
            )
            assert accuracy == pytest.approx(measured[name], abs=0.011)
        assert len(set(measured.values())) > 1, "the trials should not all score alike"
        # raylm's own client speaks the route too, and gets the same answer.
        from raylm.client import Client

        via_client = Client(url).classify(texts[:3], model=names[1])
        assert [d["label"] for d in via_client["data"]] == [
            x.label for x in local.classify([(names[1], t) for t in texts[:3]])
        ]
        # Client mistakes are 4xx JSON errors, and the app keeps answering.
        assert (
            post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0]
            == 400
        )
        status, body = post(url + "/v1/ner", {"input": "hi"})
        assert status == 400 and "POST /v1/classify" in body["error"]["message"]
        for bad in (
            {"input": []},
            {"input": ["ok", ""]},
            {"input": 5},
            {"texts": ["a"]},
            {"input": "x", "model": "nope"},
            {"input": "word " * 600},
        ):
            status, body = post(url + "/v1/classify", bad)
            assert 400 <= status < 500 and "error" in body, (bad, status, body)
        assert post(url + "/v1/classify", b"{bad json")[0] == 400
        assert post(url + "/v1/classify", {"input": "Great film."})[0] == 200
    finally:
        shutdown()


def test_ner_over_http_finds_entities_with_character_offsets_like_in_process(ner):
    from raylm.serving.deploy import resolve_target, shutdown, start
    from raylm.serving.predictor import Predictor

    spec, result = ner
    plan = resolve_target(
        result.best_checkpoint, [f"serve.port={spec.serve.port}", "serve.num_cpus=0.5"]
    )
    url = start(plan)
    try:
        local = Predictor(plan.models)
        evals = rows("ner")
        texts = [" ".join(r["tokens"]) for r in evals]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda t: post(url + "/v1/ner", {"input": t}), texts))
        assert all(status == 200 for status, _ in answers)
        want = local.ner([(plan.models[0][0], t) for t in texts])
        from raylm.client import Client

        via_client = Client(url).ner(texts[:2])  # raylm's client speaks the route too
        assert [[x["entity"] for x in d["entities"]] for d in via_client["data"]] == [
            [x.entity for x in ents] for ents in want[:2]
        ]
        hits = n_pred = n_true = 0
        for row, text, (_, body), exp in zip(evals, texts, answers, want, strict=True):
            got = body["data"][0]["entities"]
            assert [(e["entity"], e["start"], e["end"]) for e in got] == [
                (e.entity, e.start, e.end) for e in exp
            ]
            # Offsets index the text; map them back to word spans and score like training does.
            starts = [len(" ".join(row["tokens"][:i])) + (i > 0) for i in range(len(row["tokens"]))]
            spans = set()
            for e in got:
                assert text[e["start"] : e["end"]] == e["text"]
                first, last = (
                    starts.index(e["start"]),
                    max(i for i, s in enumerate(starts) if s < e["end"]),
                )
                spans.add((e["entity"], first, last + 1))
            truth = set(bio_spans(row["tags"]))
            hits, n_pred, n_true = (
                hits + len(spans & truth),
                n_pred + len(spans),
                n_true + len(truth),
            )
        f1 = entity_scores(hits, n_pred, n_true)["entity_f1"]
        print(
            f"\n/v1/ner entity F1 on the eval set {f1:.3f}; training measured "
            f"{result.best_metrics['entity_f1']:.3f}"
        )
        assert f1 == pytest.approx(result.best_metrics["entity_f1"], abs=0.02)
        status, body = post(url + "/v1/classify", {"input": "hi"})
        assert status == 400 and "POST /v1/ner" in body["error"]["message"]
        status, body = post(
            url + "/v1/ner", {"input": ["Maria Garcia flew to Paris .", "no names here"]}
        )
        assert status == 200 and [d["index"] for d in body["data"]] == [0, 1]
    finally:
        shutdown()
