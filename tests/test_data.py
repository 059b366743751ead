"""Data: builtin arithmetic, file sources, formats and their loss masks, split, packing, shards;
classification and NER rows with their label maps and sub-token alignment; the shipped sets."""

from __future__ import annotations

import json

import pytest

from raylm.builtins import MINILM
from raylm.data import (
    IGNORE_INDEX,
    build_datasets,
    builtin_arithmetic,
    collate,
    label_names,
    load_records,
    pack,
    shard_indices,
    split_records,
    steps_per_epoch,
    tokenize_chat,
    tokenize_instruction,
    tokenize_ner,
    tokenize_text,
)
from raylm.job import spec_from_dict
from raylm.models import build_char_tokenizer, resolve_model_path
from tests.conftest import REPO


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
    ex = tokenize_instruction(
        tok, "Q: {instruction}\nA: ", {"instruction": "2+2", "output": "4"}, 64
    )
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(targets) == "4" + tok.eos_token
    prompt_len = ex.labels.index(targets[0])
    assert tok.decode(ex.input_ids[:prompt_len], skip_special_tokens=True) == "Q: 2+2\nA: "


def test_chat_loss_is_on_assistant_turns_only(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
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
    assert (b["labels"][0, len(exs[0].input_ids) :] == IGNORE_INDEX).all()


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
    assert steps_per_epoch(100, 16) == 6
    assert steps_per_epoch(15, 16) == 0


@pytest.mark.parametrize("worlds", [(1, 2), (2, 3), (1, 3)])
def test_a_step_takes_the_same_examples_on_any_worker_count(worlds):
    """Step s of a G-example global batch covers shuffle positions [s·G, (s+1)·G) whether 1, 2 or
    more workers make it (each accumulating G / (micro × world) micro batches): a run resumed
    on another worker count continues at the same example, none repeated or skipped."""
    micro, global_batch, n, steps = 2, 12, 100, 8

    def examples_per_step(world: int) -> list[set[int]]:
        accum = global_batch // (micro * world)
        shards = [
            shard_indices(n, r, world, epoch=0, seed=3, per_rank=steps * accum * micro)
            for r in range(world)
        ]
        return [
            {i for shard in shards for i in shard[s * accum * micro : (s + 1) * accum * micro]}
            for s in range(steps)
        ]

    a, b = (examples_per_step(w) for w in worlds)
    assert a == b
    assert all(len(step) == global_batch for step in a)
    assert len(set().union(*a)) == steps * global_batch


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
    (tmp_path / "part-0.jsonl").write_text(
        "\n".join(json.dumps({"text": f"t{i}"}) for i in range(7))
    )
    assert [r["text"] for r in load_records(str(tmp_path), split="train")] == [
        f"t{i}" for i in range(7)
    ]


def test_build_datasets_with_explicit_eval_and_limit(tmp_path, tok):
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    tr.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(30)))
    ev.write_text("\n".join(json.dumps({"text": f"eval {i}"}) for i in range(5)))
    spec = spec_from_dict(
        {
            "data": {
                "train": str(tr),
                "eval": str(ev),
                "format": "text",
                "num_examples": 12,
                "max_length": 16,
            }
        }
    )
    data = build_datasets(spec, tok)
    assert len(data.train) == 12 and len(data.evals) == 5 and data.labels is None


def test_rows_missing_fields_are_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x"}))
    spec = spec_from_dict({"data": {"train": str(path), "eval": str(path)}})
    with pytest.raises(ValueError, match="instruction/output"):
        build_datasets(spec, tok)


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ner_labels_sit_on_each_words_first_sub_token_only(minilm_tok):
    words = ["Amara", "Okafor", "visited", "Rio", "de", "Janeiro", "."]
    tags = [1, 2, 0, 3, 4, 4, 0]
    ex = tokenize_ner(minilm_tok, words, tags, max_length=64)
    pieces = minilm_tok.convert_ids_to_tokens(ex.input_ids)
    assert len(pieces) > len(words) + 2, "the test needs words split into several sub-tokens"
    labelled = [(p, lab) for p, lab in zip(pieces, ex.labels, strict=True) if lab != IGNORE_INDEX]
    # One label per word, on a piece that starts a word; continuation pieces and [CLS]/[SEP]
    # get none.
    assert [lab for _, lab in labelled] == tags
    assert not any(p.startswith("##") or p in ("[CLS]", "[SEP]") for p, _ in labelled)
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[-1] == IGNORE_INDEX
    assert any(p.startswith("##") for p in pieces)


def test_ner_truncation_drops_the_words_past_max_length(minilm_tok):
    words = ["word"] * 50
    ex = tokenize_ner(minilm_tok, words, [0] * 50, max_length=12)
    assert len(ex.input_ids) == 12 and sum(lab != IGNORE_INDEX for lab in ex.labels) == 10


def test_classification_data_builds_labels_in_sorted_order(tmp_path, minilm_tok):
    train = _write(
        tmp_path / "t.jsonl",
        [{"text": f"text {i}", "label": ["pos", "neg", "meh"][i % 3]} for i in range(9)],
    )
    spec = spec_from_dict(
        {
            "model": {"name_or_path": MINILM, "task": "sequence_classification"},
            "data": {"train": train, "eval": train},
        }
    )
    assert spec.data.format == "classification"  # the task's own format when none is given
    data = build_datasets(spec, minilm_tok)
    assert data.labels == ["meh", "neg", "pos"]
    assert [e.label for e in data.train[:3]] == [2, 1, 0]
    batch = collate(data.train[:4], minilm_tok.pad_token_id)
    assert batch["labels"].tolist() == [2, 1, 0, 2] and batch["input_ids"].shape[0] == 4


def test_integer_labels_and_named_labels(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    spec = spec_from_dict(
        {"model": {"task": "sequence_classification"}, "data": {"format": "classification"}}
    )
    assert label_names(spec, rows) == ["0", "1", "2"]
    named = spec_from_dict(
        {"model": {"task": "sequence_classification", "labels": ["x", "y", "z"]}}
    )
    assert label_names(named, rows) == ["x", "y", "z"]
    ner = spec_from_dict({"model": {"task": "token_classification"}})
    with pytest.raises(ValueError, match="integers: list their BIO names in model.labels"):
        label_names(ner, [{"tokens": ["a"], "tags": [0]}])
    assert label_names(
        ner,
        [
            {"tokens": ["a", "b", "c"], "tags": ["I-PER", "B-PER", "O"]},
            {"tokens": ["d"], "tags": ["B-LOC"]},
        ],
    ) == ["O", "B-LOC", "B-PER", "I-PER"]
    with pytest.raises(ValueError, match="NER tags must be"):
        label_names(ner, [{"tokens": ["a"], "tags": ["PERSON"]}])
    with pytest.raises(ValueError, match="all strings or all integers"):
        label_names(spec, [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}])


def test_bad_classifier_rows_are_named(tmp_path, minilm_tok):
    train = _write(
        tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    )
    bad_eval = _write(
        tmp_path / "e.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "meh"}]
    )
    spec = spec_from_dict(
        {
            "model": {"task": "sequence_classification", "labels": ["neg", "pos"]},
            "data": {"train": train, "eval": bad_eval},
        }
    )
    with pytest.raises(ValueError, match="row 1: label 'meh' is not one of"):
        build_datasets(spec, minilm_tok)
    ner = _write(tmp_path / "n.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    spec = spec_from_dict(
        {"model": {"task": "token_classification"}, "data": {"train": ner, "eval": ner}}
    )
    with pytest.raises(ValueError, match="row 0 has 2 words and 1 tags"):
        build_datasets(spec, minilm_tok)


def test_shipped_datasets_are_what_the_generator_writes():
    import importlib.util

    path = f"{REPO}/jobs/data/generate.py"
    module_spec = importlib.util.spec_from_file_location("generate", path)
    gen = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gen)
    for name, (train, evals) in (("sentiment", gen.sentiment()), ("ner", gen.ner())):
        for split, rows in (("train", train), ("eval", evals)):
            shipped = [json.loads(line) for line in open(f"{REPO}/jobs/data/{name}/{split}.jsonl")]
            assert shipped == rows, (
                f"jobs/data/{name}/{split}.jsonl differs from generate.py's output"
            )
        assert len(train) >= 300 and len(evals) >= 80
        key = "text" if name == "sentiment" else "tokens"
        assert not {str(r[key]) for r in train} & {str(r[key]) for r in evals}, (
            "eval rows leak into train"
        )


def test_shipped_chat_set_is_what_the_generator_writes_and_holds_out_unseen_names():
    import importlib.util

    path = f"{REPO}/jobs/data/generate.py"
    module_spec = importlib.util.spec_from_file_location("generate", path)
    gen = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(gen)
    train, evals = gen.chat()
    for split, rows in (("train", train), ("eval", evals)):
        shipped = [json.loads(line) for line in open(f"{REPO}/jobs/data/chat/{split}.jsonl")]
        assert shipped == rows, f"jobs/data/chat/{split}.jsonl differs from generate.py's output"
    assert (len(train), len(evals)) == (600, 60)
    for row in train + evals:  # system, user, then the exact answer to learn
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    answers = [r["messages"][2]["content"] for r in evals]
    assert sum(a in ("positive", "negative") for a in answers) == 20
    ner_answers = [a for a in answers if a.startswith("people: ")]
    assert len(ner_answers) == 40 and any(not a.startswith("people: none") for a in ner_answers)

    # No name in a held-out answer appears in any training answer.
    def names(answer: str) -> set[str]:
        return {
            n.strip()
            for part in answer.split("; ")
            for n in part.split(": ", 1)[1].split(",")
            if n.strip() != "none"
        }

    seen = set().union(
        *(
            names(r["messages"][2]["content"])
            for r in train
            if r["messages"][2]["content"].startswith("people: ")
        )
    )
    assert not set().union(*map(names, ner_answers)) & seen
