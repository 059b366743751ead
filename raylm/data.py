"""Datasets: sources (files, save_to_disk dirs, hub names, builtin sets), prompt formats with loss
masks, labelled text and BIO-tagged words for the classifier tasks, train/eval split, packing,
per-worker shards and batching."""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raylm.builtins import ARITHMETIC
from raylm.job import JobSpec
from raylm.job.checks import is_bio_tag

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (HF convention)
ARITHMETIC_SEED = 1234
ARITHMETIC_DEFAULT_SIZE = 2000
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Example:
    """One tokenized row: ids, per-token labels (IGNORE_INDEX where no loss) or one class
    `label` for a whole-text classifier, and the raw row for eval."""

    input_ids: list[int]
    labels: list[int]
    row: dict[str, Any] | None = None
    label: int | None = None


@dataclass
class Datasets:
    """A job's tokenized (train, eval) examples and, for classifier tasks, the label names."""

    train: list[Example]
    evals: list[Example]
    labels: list[str] | None = None


def builtin_arithmetic(
    n: int = ARITHMETIC_DEFAULT_SIZE, seed: int = ARITHMETIC_SEED
) -> list[dict[str, str]]:
    """`n` distinct addition problems (instruction/input/output), the same for a given seed.

    Operands are below 50, so every answer is a short exact string a model can be scored on.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    return [
        {"instruction": f"{a}+{b}", "input": "", "output": str(a + b)}
        for a, b in pairs[: min(n, len(pairs))]
    ]


def load_records(
    source: str, split: str = "train", trust_remote_code: bool = False
) -> list[dict[str, Any]]:
    """Reads rows from a local file, a `save_to_disk` dir, a hub dataset or a builtin set."""
    if source == ARITHMETIC:
        return builtin_arithmetic()
    import datasets

    path = os.path.expanduser(source)
    suffix = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and suffix in _FILE_BUILDERS:
        ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=path, split="train")
    elif any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")
    ):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        # A hub dataset or a local directory of data files: the same `load_dataset` call.
        # Newer `datasets` dropped dataset scripts and with them `trust_remote_code`.
        kwargs = {}
        if (
            trust_remote_code
            and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters
        ):
            kwargs["trust_remote_code"] = True
        ds = datasets.load_dataset(path, split=split, **kwargs)
    return [dict(r) for r in ds]


def split_records(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic hold-out: returns (train, eval) with at least one eval row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def format_prompt(template: str, row: Mapping[str, Any]) -> str:
    """Fills `{instruction}` and `{input}`; plain replace, so other braces in a template stay."""
    return template.replace("{instruction}", str(row.get("instruction", ""))).replace(
        "{input}", str(row.get("input", "") or "")
    )


def _ids(out: Any) -> list[int]:
    # apply_chat_template returns a list or, in newer transformers, a BatchEncoding.
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def generation_prompt_ids(
    tok: PreTrainedTokenizerBase,
    data_format: str | None,
    template: str | None,
    messages: list[Mapping[str, str]],
) -> list[int]:
    """Token ids that ask a model for the next assistant turn, in the format it was trained on.

    `instruction` models see the last user message through their prompt template (they were
    trained single-turn); `chat` models, and any model whose tokenizer has a chat template, get
    the chat template with its generation prompt; other models get the turns joined by newlines.
    """
    if data_format == "instruction" and template:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return tok(format_prompt(template, {"instruction": last_user}))["input_ids"]
    if getattr(tok, "chat_template", None):
        return _ids(
            tok.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        )
    return tok("\n".join(m["content"] for m in messages) + "\n")["input_ids"]


def tokenize_instruction(
    tok: PreTrainedTokenizerBase, template: str, row: Mapping[str, Any], max_length: int
) -> Example:
    """Prompt + output + eos; the loss sees only the output and eos."""
    prompt = tok(format_prompt(template, row))["input_ids"]
    answer = tok(str(row["output"]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return Example(ids, labels, dict(row))


def tokenize_chat(
    tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_length: int
) -> Example:
    """The chat template over all turns; the loss sees only assistant turns.

    Each assistant span is found by rendering the conversation up to the turn (with the
    generation prompt) and through it, so any prefix-stable template works, not just ones
    with `{% generation %}` markers.
    """
    ids = _ids(tok.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        start = len(
            _ids(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True))
        )
        end = len(_ids(tok.apply_chat_template(messages[: i + 1], tokenize=True)))
        labels[start:end] = ids[start:end]
    return Example(ids[:max_length], labels[:max_length], {"messages": messages})


def tokenize_text(tok: PreTrainedTokenizerBase, text: str, max_length: int) -> Example:
    """Plain language modelling: every token is a target."""
    ids = (tok(text)["input_ids"] + [tok.eos_token_id])[:max_length]
    return Example(ids, list(ids), {"text": text})


def _row_labels(spec: JobSpec, rows: list[dict[str, Any]]) -> list[Any]:
    """Every label value in the rows (each word's tag for NER); ValueError for a missing field."""
    d = spec.data
    field = d.tags_field if d.format == "ner" else d.label_field
    values: list[Any] = []
    for i, row in enumerate(rows):
        if field not in row:
            raise ValueError(f"row {i} lacks the {field!r} field: {sorted(row)}")
        values += list(row[field]) if d.format == "ner" else [row[field]]
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def label_names(spec: JobSpec, rows: list[dict[str, Any]]) -> list[str] | None:
    """The classifier's label names in id order: `model.labels`, else those in the rows, sorted
    (`O` first, then each type's B before I, for NER). None for causal LM.

    Raises ValueError for mixed or non-BIO labels, or integer NER tags without names.
    """
    m, fmt = spec.model, spec.data.format
    if fmt not in ("classification", "ner"):
        return None
    if m.labels is not None:
        return list(m.labels)
    values = _row_labels(spec, rows)
    if values and all(_is_int(v) for v in values):
        if fmt == "ner":
            raise ValueError("the NER tags are integers: list their BIO names in model.labels")
        return [str(i) for i in range(max(m.num_labels or 0, max(values) + 1))]
    if not all(isinstance(v, str) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise ValueError(f"labels must be all strings or all integers, found {kinds}")
    names = sorted(set(values))
    if fmt == "ner":
        bad = [t for t in names if not is_bio_tag(t)]
        if bad:
            raise ValueError(f"NER tags must be `O`, `B-TYPE` or `I-TYPE`; found {bad[:5]}")
        names.sort(key=lambda t: (t != "O", t[2:], t[:1]))
    if m.num_labels is not None and m.num_labels != len(names):
        raise ValueError(
            f"model.num_labels is {m.num_labels} but the data has {len(names)} labels {names}"
        )
    return names


def _label_id(value: Any, names: list[str], where: str) -> int:
    if _is_int(value) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise ValueError(f"{where}: label {value!r} is not one of {names}")


def tokenize_classification(
    tok: PreTrainedTokenizerBase, text: str, label: int, max_length: int
) -> Example:
    """A text and its class id; text past `max_length` tokens is cut."""
    ids = tok(text, truncation=True, max_length=max_length)["input_ids"]
    return Example(list(ids), [], {"text": text}, label)


def tokenize_ner(
    tok: PreTrainedTokenizerBase, words: list[str], tags: list[int], max_length: int
) -> Example:
    """Words and their tag ids: each word's first sub-token carries its tag, the other sub-tokens
    and special tokens IGNORE_INDEX (no loss, not scored). Words cut by `max_length` are lost."""
    if not tok.is_fast:
        raise ValueError(
            "NER data needs a fast tokenizer (word alignment); this model has a slow one"
        )
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=max_length)
    labels, prev = [], None
    for w in enc.word_ids():
        labels.append(IGNORE_INDEX if w is None or w == prev else tags[w])
        prev = w
    return Example(list(enc["input_ids"]), labels, {"tokens": list(words), "tags": list(tags)})


def tokenize_rows(
    spec: JobSpec,
    tok: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    labels: list[str] | None = None,
) -> list[Example]:
    """Tokenizes rows in the job's format (classifier rows against `labels`); raises ValueError
    naming a row missing its fields or holding an unknown label."""
    d = spec.data
    out = []
    for i, row in enumerate(rows):
        if d.format in ("classification", "ner"):
            assert labels is not None, "classifier formats need label names"
            out.append(_tokenize_labelled(spec, tok, row, i, labels))
        elif d.format == "instruction":
            if "instruction" not in row or "output" not in row:
                raise ValueError(f"row {i} lacks instruction/output fields: {sorted(row)}")
            out.append(tokenize_instruction(tok, d.template, row, d.max_length))
        elif d.format == "chat":
            if d.messages_field not in row:
                raise ValueError(f"row {i} lacks the {d.messages_field!r} field: {sorted(row)}")
            out.append(tokenize_chat(tok, row[d.messages_field], d.max_length))
        else:
            if d.text_field not in row:
                raise ValueError(f"row {i} lacks the {d.text_field!r} field: {sorted(row)}")
            out.append(tokenize_text(tok, str(row[d.text_field]), d.max_length))
    return out


def _tokenize_labelled(
    spec: JobSpec, tok: PreTrainedTokenizerBase, row: dict[str, Any], i: int, labels: list[str]
) -> Example:
    d = spec.data
    if d.format == "classification":
        if d.text_field not in row or d.label_field not in row:
            raise ValueError(
                f"row {i} lacks the {d.text_field!r}/{d.label_field!r} fields: {sorted(row)}"
            )
        label = _label_id(row[d.label_field], labels, f"row {i}")
        return tokenize_classification(tok, str(row[d.text_field]), label, d.max_length)
    if d.tokens_field not in row or d.tags_field not in row:
        raise ValueError(
            f"row {i} lacks the {d.tokens_field!r}/{d.tags_field!r} fields: {sorted(row)}"
        )
    words, tags = list(row[d.tokens_field]), list(row[d.tags_field])
    if len(words) != len(tags) or not words:
        raise ValueError(
            f"row {i} has {len(words)} words and {len(tags)} tags; needs one tag per word"
        )
    ids = [_label_id(t, labels, f"row {i} word {j}") for j, t in enumerate(tags)]
    return tokenize_ner(tok, [str(w) for w in words], ids, d.max_length)


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenates examples and cuts full `max_length` rows (a tail that doesn't fill one is
    dropped)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [
        Example(ids[i : i + max_length], labels[i : i + max_length])
        for i in range(0, len(ids) - max_length + 1, max_length)
    ]


def build_datasets(spec: JobSpec, tok: PreTrainedTokenizerBase) -> Datasets:
    """Loads, splits and tokenizes the job's data; returns the train and eval examples and the
    label names (from train and eval together, so every worker and the server agree)."""
    d = spec.data
    trust = spec.model.trust_remote_code
    rows = load_records(d.train, d.split, trust)
    if d.eval is not None:
        train_rows, eval_rows = rows, load_records(d.eval, d.split, trust)
    else:
        train_rows, eval_rows = split_records(rows, d.eval_fraction, spec.training.seed)
    if d.num_examples is not None:
        train_rows = train_rows[: d.num_examples]
    labels = label_names(spec, train_rows + eval_rows)
    train = tokenize_rows(spec, tok, train_rows, labels)
    evals = tokenize_rows(spec, tok, eval_rows, labels)
    if d.packing:
        train = pack(train, d.max_length)
    return Datasets(train, evals, labels)


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    """Optimizer steps in one epoch of `global_batch`-example steps; every worker runs the same
    number (collectives need it), whatever the worker count."""
    return n_examples // global_batch


def shard_indices(
    n: int, rank: int, world_size: int, epoch: int, seed: int, per_rank: int
) -> list[int]:
    """This worker's `per_rank` example indices for `epoch`: a seeded shuffle, split by rank.

    Strided, so optimizer step s of any worker count takes positions [s·G, (s+1)·G) of the
    shuffle (G the global batch) when each worker accumulates G / (micro × world) micro batches:
    a run resumed on another worker count continues at the same example."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order[rank::world_size][:per_rank]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its longest row; returns input_ids, attention_mask and labels (one
    class id per row for a whole-text classifier, else one per token)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    if batch[0].label is not None:
        labels = torch.tensor([e.label for e in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
