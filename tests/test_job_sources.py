"""Sources a job names, checked when it loads (exit 2 before any Ray work): local model
directories (missing, pickled, GGUF without its reader, no chat template for chat data) and chat
data files whose rows have no assistant turn."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from raylm.job import JobSpecError, spec_from_dict
from raylm.metrics import normalized_answer


def problems(job: dict) -> list[str]:
    with pytest.raises(JobSpecError) as info:
        spec_from_dict(job)
    return info.value.problems


@pytest.fixture
def model_dir(tmp_path):
    from raylm.models import materialize_tiny_llama

    d = tmp_path / "model"
    shutil.copytree(materialize_tiny_llama(), d)
    return d


def test_a_usable_local_model_directory_passes(model_dir):
    assert spec_from_dict({"model": {"name_or_path": str(model_dir)}}).model.name_or_path


def test_a_missing_or_pickled_or_configless_model_directory_is_refused(model_dir, tmp_path):
    missing = str(tmp_path / "nope")
    assert problems({"model": {"name_or_path": missing}}) == [
        f"model.name_or_path={missing!r}: no such model directory"
    ]
    (model_dir / "model.pt").write_bytes(b"\x80")
    assert (
        "holds pickle-format files ['model.pt']"
        in problems({"model": {"name_or_path": str(model_dir)}})[0]
    )
    (model_dir / "model.pt").unlink()
    (model_dir / "config.json").unlink()
    assert (
        "no config.json or .gguf file" in problems({"model": {"name_or_path": str(model_dir)}})[0]
    )


def test_a_gguf_only_directory_needs_the_gguf_package(tmp_path, monkeypatch):
    d = tmp_path / "gguf-model"
    d.mkdir()
    (d / "m.Q4_1.gguf").write_bytes(b"GGUF")
    job = {"model": {"name_or_path": str(d)}}
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if it were not installed
    assert problems(job) == [
        f"model.name_or_path={str(d)!r}: holds only m.Q4_1.gguf: reading GGUF needs "
        "`pip install gguf`"
    ]
    monkeypatch.delitem(sys.modules, "gguf")
    pytest.importorskip("gguf")
    assert spec_from_dict(job)  # with the reader installed it is converted when first used


def test_chat_data_needs_a_model_with_a_chat_template(model_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        )
        + "\n"
    )
    job = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "format": "chat"},
    }
    assert spec_from_dict(job).data.format == "chat"
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (only,) = problems(job)
    assert only.startswith("data.format='chat': ") and "no chat template" in only
    job["data"]["format"] = "text"  # other formats need no template
    job["data"]["train"] = str(data)
    assert "no chat template" not in " ".join(p for p in _problems_or_none(job))


def _problems_or_none(job: dict) -> list[str]:
    try:
        spec_from_dict(job)
    except JobSpecError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        (
            [{"messages": [{"role": "user", "content": "q"}]}],
            "row 0 has no assistant turn to learn from",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                },
                {"text": "no messages"},
            ],
            "row 1 has no 'messages' list",
        ),
        ([{"messages": "not a list"}], "row 0 has no 'messages' list"),
    ],
)
def test_chat_rows_without_an_assistant_turn_are_named(tmp_path, rows, why):
    for suffix, text in (
        (".jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        (".json", json.dumps(rows)),
    ):
        path = tmp_path / f"chat{suffix}"
        path.write_text(text)
        (only,) = problems({"data": {"train": str(path), "format": "chat"}})
        assert only == f"data.train={str(path)!r}: {why}"


def test_a_chat_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("{not json\n")
    (only,) = problems({"data": {"train": str(path), "format": "chat"}})
    assert only.startswith(f"data.train={str(path)!r}: cannot be read as JSON")


def test_generated_metrics_need_generation(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "assistant", "content": "b"}]}) + "\n")
    job = {
        "data": {"train": str(data), "format": "chat"},
        "checkpoint": {"metric": "exact_match_normalized", "mode": "max"},
        "serve": {"promote_if": {"exact_match": {"min": 0.5}}},
    }
    found = problems(job)
    assert any(p.startswith("checkpoint.metric='exact_match_normalized'") for p in found)
    assert any(p.startswith("serve.promote_if.exact_match=") for p in found)
    job["training"] = {"eval_exact_match": True}  # asked for: chat answers are scored
    assert spec_from_dict(job).exact_match_enabled


def test_answers_compare_loosely_ignoring_case_spacing_and_end_punctuation():
    assert normalized_answer("  The capital is  PARIS. ") == "the capital is paris"
    assert normalized_answer("people: Ana; places: none") == "people: ana; places: none"
    assert normalized_answer("'positive'!") == "positive"
    assert normalized_answer("a,b") != normalized_answer("a b")  # inner punctuation counts
    assert normalized_answer("") == "" and normalized_answer(" .! ") == ""
