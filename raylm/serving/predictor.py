"""Classification and NER for serving: labels with scores for whole texts, entities with
character offsets for words. No Ray here — a Serve replica wraps a Predictor, and tests call one
directly as the in-process reference.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raylm.checkpoint import load_served, task_of
from raylm.metrics import bio_spans
from raylm.tasks import TASKS


@dataclass
class Label:
    """A text's predicted class, its probability, and every class's probability."""

    label: str
    score: float
    scores: dict[str, float]


@dataclass
class Entity:
    """One entity: its type, the text it covers, `text[start:end]` offsets, mean word
    probability."""

    entity: str
    text: str
    start: int
    end: int
    score: float


class Predictor:
    """Loaded classifier(s) and tokenizer.

    `models` is a list of (served name, checkpoint dir); the first is the default. Several
    entries must be LoRA adapters over one base (each with its own trained head), all trained
    for the same task.
    """

    def __init__(self, models: Sequence[tuple[str, str]], trust_remote_code: bool | None = None):
        tasks = {task_of(p) for _, p in models}
        if len(tasks) != 1 or not TASKS[next(iter(tasks))].labelled:
            raise ValueError(f"a Predictor serves one classifier task, got {sorted(tasks)}")
        self.task = tasks.pop()
        served = load_served(models, trust_remote_code)
        self.tokenizer, self.model, self.names = served.tokenizer, served.model, served.names
        self._adapter, self._multi = served.adapter, served.multi
        if not self.tokenizer.is_fast:
            raise ValueError("serving a classifier needs a fast tokenizer (offsets and word ids)")
        config = self.model.config
        default = [config.id2label[i] for i in range(config.num_labels)]
        self.labels = {n: list(m.get("labels") or default) for n, m in served.metadata.items()}
        self.context_tokens = int(getattr(config, "max_position_embeddings", 0) or 512)
        # set_adapter swaps the active adapter on the shared module: one forward at a time.
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for `text`, special tokens included."""
        return len(self.tokenizer(text)["input_ids"])

    def _forward(self, model: str, texts: list[str]) -> tuple[Any, Any]:
        """(tokenizer output with offsets, softmax probabilities) for texts under one model."""
        import torch

        enc = self.tokenizer(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        with self._lock, torch.inference_mode():
            if self._multi:
                self.model.set_adapter(self._adapter[model])
            logits = self.model(**enc).logits
        enc["offset_mapping"] = offsets
        return enc, torch.softmax(logits.float(), dim=-1)

    def _by_model(self, items: Sequence[tuple[str, str]], run: Any) -> list[Any]:
        """Runs `run(model, texts)` once per model over (model, text) items; answers in order."""
        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(model, []).append(i)
        for model, idx in groups.items():
            for i, answer in zip(idx, run(model, [items[i][1] for i in idx]), strict=True):
                out[i] = answer
        return out

    def classify(self, items: Sequence[tuple[str, str]]) -> list[Label]:
        """(model, text) pairs → the predicted label and class probabilities of each text."""

        def run(model: str, texts: list[str]) -> list[Label]:
            names = self.labels[model]
            _, probs = self._forward(model, texts)
            out = []
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                out.append(Label(names[best], row[best], dict(zip(names, row, strict=True))))
            return out

        return self._by_model(items, run)

    def ner(self, items: Sequence[tuple[str, str]]) -> list[list[Entity]]:
        """(model, text) pairs → the entities of each text.

        The tokenizer splits a text into words (whitespace and punctuation, as CoNLL data is
        split); each word's tag is the prediction at its first sub-token, as in training, and
        BIO runs of words become entities spanning their characters.
        """

        def run(model: str, texts: list[str]) -> list[list[Entity]]:
            names = self.labels[model]
            enc, probs = self._forward(model, texts)
            out = []
            for b, text in enumerate(texts):
                word_ids, offsets = enc.word_ids(b), enc["offset_mapping"][b].tolist()
                first: dict[int, int] = {}
                last: dict[int, int] = {}
                for pos, w in enumerate(word_ids):
                    if w is not None:
                        first.setdefault(w, pos)
                        last[w] = pos
                words = sorted(first)
                best = probs[b].max(dim=-1)
                tags = [names[int(best.indices[first[w]])] for w in words]
                conf = [float(best.values[first[w]]) for w in words]
                entities = []
                for kind, i, j in bio_spans(tags):
                    start, end = offsets[first[words[i]]][0], offsets[last[words[j - 1]]][1]
                    entities.append(
                        Entity(kind, text[start:end], start, end, sum(conf[i:j]) / (j - i))
                    )
                out.append(entities)
            return out

        return self._by_model(items, run)
