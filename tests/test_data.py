"""Data: builtin arithmetic, file sources, formats and their loss masks, split, packing, shards."""

from __future__ import annotations

import json

import pytest

from raylm.data import (
    IGNORE_INDEX,
    build_datasets,
    builtin_arithmetic,
    collate,
    load_records,
    pack,
    shard_indices,
    split_records,
    steps_per_epoch,
    tokenize_chat,
    tokenize_instruction,
    tokenize_text,
)
from raylm.models import build_char_tokenizer
from raylm.spec import spec_from_dict


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_builtin_arithmetic_is_deterministic_distinct_and_correct():
    rows = builtin_arithmetic(500)
    assert rows == builtin_arithmetic(500)
    assert len({r["instruction"] for r in rows}) == 500
    for r in rows:
        a, b = r["instruction"].split("+")
        assert int(r["output"]) == int(a) + int(b)


def test_instruction_loss_is_on_the_output_only(tok):
    ex = tokenize_instruction(tok, "Q: {instruction}\nA: ", {"instruction": "2+2", "output": "4"}, 64)
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(targets) == "4" + tok.eos_token
    prompt_len = ex.labels.index(targets[0])
    assert tok.decode(ex.input_ids[:prompt_len], skip_special_tokens=True) == "Q: 2+2\nA: "


def test_chat_loss_is_on_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]
    ex = tokenize_chat(tok, msgs, 256)
    spans = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "yo" in spans and "ok" in spans
    assert "hi" not in spans and "again" not in spans and "user" not in spans


def test_text_is_all_targets_and_truncated(tok):
    ex = tokenize_text(tok, "hello world" * 10, 16)
    assert len(ex.input_ids) == 16 and ex.labels == ex.input_ids


def test_packing_fills_rows(tok):
    exs = [tokenize_text(tok, "abc def", 64) for _ in range(10)]
    packed = pack(exs, 16)
    assert all(len(e.input_ids) == 16 for e in packed)
    assert len(packed) == sum(len(e.input_ids) for e in exs) // 16


def test_collate_pads_and_masks(tok):
    exs = [tokenize_text(tok, "a", 8), tokenize_text(tok, "abcd", 8)]
    b = collate(exs, tok.pad_token_id)
    assert b["input_ids"].shape == b["labels"].shape == (2, len(exs[1].input_ids))
    assert b["attention_mask"][0].sum() == len(exs[0].input_ids)
    assert (b["labels"][0, len(exs[0].input_ids):] == IGNORE_INDEX).all()


def test_split_is_deterministic_and_disjoint():
    rows = [{"i": i} for i in range(100)]
    train, ev = split_records(rows, 0.1, seed=3)
    assert len(ev) == 10 and len(train) == 90
    assert {r["i"] for r in train}.isdisjoint(r["i"] for r in ev)
    assert split_records(rows, 0.1, seed=3) == (train, ev)


def test_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    a = shard_indices(100, 0, 2, epoch=0, seed=0, per_rank=48)
    b = shard_indices(100, 1, 2, epoch=0, seed=0, per_rank=48)
    assert len(a) == len(b) == 48 and set(a).isdisjoint(b)
    assert shard_indices(100, 0, 2, epoch=1, seed=0, per_rank=48) != a


def test_steps_per_epoch_counts_full_global_batches():
    spec = spec_from_dict({"training": {"micro_batch_size": 4, "grad_accum": 2}})
    assert steps_per_epoch(100, spec, world_size=2) == 100 // 8 // 2


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet", "disk"])
def test_local_sources_load(tmp_path, suffix):
    import datasets

    rows = [{"instruction": f"{i}+1", "input": "", "output": str(i + 1)} for i in range(20)]
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == "csv":
        ds.to_csv(str(path))
    elif suffix == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    loaded = load_records(str(path))
    # CSV infers numeric columns; raylm stringifies outputs when it tokenizes and scores them.
    assert [str(r["output"]) for r in loaded] == [r["output"] for r in rows]


def test_a_directory_of_files_goes_through_load_dataset(tmp_path):
    # The hub branch: `datasets.load_dataset(name_or_dir, split=...)`, exercised offline.
    (tmp_path / "part-0.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(7)))
    assert [r["text"] for r in load_records(str(tmp_path), split="train")] == [f"t{i}" for i in range(7)]


def test_build_datasets_with_explicit_eval_and_limit(tmp_path, tok):
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    tr.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(30)))
    ev.write_text("\n".join(json.dumps({"text": f"eval {i}"}) for i in range(5)))
    spec = spec_from_dict({"data": {"train": str(tr), "eval": str(ev), "format": "text",
                                    "num_examples": 12, "max_length": 16}})
    data = build_datasets(spec, tok)
    assert len(data.train) == 12 and len(data.evals) == 5 and data.labels is None


def test_rows_missing_fields_are_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x"}))
    spec = spec_from_dict({"data": {"train": str(path), "eval": str(path)}})
    with pytest.raises(ValueError, match="instruction/output"):
        build_datasets(spec, tok)
