"""Scores for the classifier tasks, in plain Python so workers, servers and tests share them:
accuracy and macro-F1 from a confusion matrix, and entity-level precision/recall/F1 over BIO tags.

Entity scoring follows conlleval (what `seqeval`'s default mode reproduces): an entity is a run
of `B-X`/`I-X` words of one type, an `I-X` after `O` or after another type starts a new one, and
a predicted entity counts only if its type and both boundaries match. Counts (not ratios) are
what workers all-reduce, so scores over shards equal scores over the whole eval set.
"""

from __future__ import annotations

import string
from collections.abc import Sequence


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities in a BIO tag sequence as (type, first word, end word exclusive)."""
    spans: list[tuple[str, int, int]] = []
    kind: str | None = None
    start = 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, this = tag.partition("-") if tag != "O" else ("O", "", "")
        if kind is not None and (prefix != "I" or this != kind):
            spans.append((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and kind is None):
            kind, start = this, i
    return spans


def entity_counts(
    true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]
) -> tuple[int, int, int]:
    """(correct entities, predicted entities, true entities) over aligned tag sequences."""
    hits = n_pred = n_true = 0
    for t, p in zip(true, pred, strict=True):
        ts, ps = set(bio_spans(t)), set(bio_spans(p))
        hits += len(ts & ps)
        n_pred += len(ps)
        n_true += len(ts)
    return hits, n_pred, n_true


def entity_scores(hits: float, n_pred: float, n_true: float) -> dict[str, float]:
    """Entity precision, recall and F1 (micro over entities; 0 where undefined, as seqeval)."""
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


def confusion(true: Sequence[int], pred: Sequence[int], num_labels: int) -> list[list[int]]:
    """`num_labels` × `num_labels` counts: row = true class, column = predicted class."""
    out = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(true, pred, strict=True):
        out[t][p] += 1
    return out


def classification_scores(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix. Macro-F1 averages the classes that occur
    as a truth or a prediction (scikit-learn's default), each with F1 0 where it has no hit."""
    k = len(matrix)
    total = sum(sum(row) for row in matrix)
    hits = sum(matrix[i][i] for i in range(k))
    f1s = []
    for c in range(k):
        n_true, n_pred = sum(matrix[c]), sum(matrix[r][c] for r in range(k))
        if n_true or n_pred:
            f1s.append(2 * matrix[c][c] / (n_true + n_pred))
    return {
        "accuracy": hits / total if total else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }


def normalized_answer(text: str) -> str:
    """An answer compared loosely: lower case, runs of whitespace as one space, and whitespace
    and punctuation at either end dropped (`" Paris."` and `"paris"` agree)."""
    return " ".join(text.lower().split()).strip(string.punctuation + string.whitespace)
