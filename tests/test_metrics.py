"""Scores: entity-level P/R/F1 agree with seqeval, accuracy and macro-F1 with scikit-learn."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raylm.metrics import bio_spans, classification_scores, confusion, entity_counts, entity_scores


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["I-ORG", "I-ORG", "O"], [("ORG", 0, 2)]),  # I- after O opens an entity (conlleval)
        (["B-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),  # a type change ends one
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        (["O", "O"], []),
        ([], []),
    ],
)
def test_bio_spans(tags, spans):
    assert bio_spans(tags) == spans


TAG = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "O", "O"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 12), min_size=1, max_size=6).flatmap(
        lambda lengths: st.tuples(
            *[
                st.tuples(
                    st.lists(TAG, min_size=n, max_size=n), st.lists(TAG, min_size=n, max_size=n)
                )
                for n in lengths
            ]
        )
    )
)
def test_entity_scores_match_seqeval(pairs):
    from seqeval.metrics import f1_score, precision_score, recall_score

    true, pred = [t for t, _ in pairs], [p for _, p in pairs]
    ours = entity_scores(*entity_counts(true, pred))
    assert ours["entity_precision"] == pytest.approx(precision_score(true, pred, zero_division=0))
    assert ours["entity_recall"] == pytest.approx(recall_score(true, pred, zero_division=0))
    assert ours["entity_f1"] == pytest.approx(f1_score(true, pred, zero_division=0))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(
                st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40
            ),
        )
    )
)
def test_accuracy_and_macro_f1_match_scikit_learn(case):
    from sklearn.metrics import accuracy_score, f1_score

    k, pairs = case
    true, pred = [t for t, _ in pairs], [p for _, p in pairs]
    ours = classification_scores(confusion(true, pred, k))
    assert ours["accuracy"] == pytest.approx(accuracy_score(true, pred))
    assert ours["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))


@pytest.mark.parametrize(
    "tags, spans",
    [
        (["B-PER"], [("PER", 0, 1)]),  # an entity at the end is closed
        (["O", "B-PER", "I-PER"], [("PER", 1, 3)]),
        (["I-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),
        (["B-NEW-TYPE", "I-NEW-TYPE"], [("NEW-TYPE", 0, 2)]),  # a type may contain a hyphen
        (["B-PER", "O", "I-PER"], [("PER", 0, 1), ("PER", 2, 3)]),
        (["B-PER", "E-PER", "I-PER"], [("PER", 0, 1), ("PER", 2, 3)]),  # not BIO: outside
        (["O", "O", "B-X"], [("X", 2, 3)]),
    ],
)
def test_bio_spans_edges(tags, spans):
    assert bio_spans(tags) == spans


def test_entity_counts_are_hits_predictions_and_truths():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-PER"]]
    assert entity_counts(true, pred) == (2, 3, 3)
    assert entity_counts([], []) == (0, 0, 0)
    with pytest.raises(ValueError):
        entity_counts([["O"]], [])


def test_entity_scores_values_and_undefined_cases():
    assert entity_scores(2, 4, 8) == {
        "entity_precision": 0.5,
        "entity_recall": 0.25,
        "entity_f1": pytest.approx(2 * 0.5 * 0.25 / 0.75),
    }
    assert entity_scores(0, 0, 3) == {
        "entity_precision": 0.0,
        "entity_recall": 0.0,
        "entity_f1": 0.0,
    }
    assert entity_scores(0, 3, 0) == {
        "entity_precision": 0.0,
        "entity_recall": 0.0,
        "entity_f1": 0.0,
    }
    assert entity_scores(3, 3, 3)["entity_f1"] == 1.0


def test_confusion_rows_are_truths_and_columns_predictions():
    assert confusion([0, 0, 1, 2], [1, 0, 1, 1], 3) == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert confusion([], [], 2) == [[0, 0], [0, 0]]
    with pytest.raises(ValueError):
        confusion([0], [0, 1], 2)


def test_classification_scores_values():
    # class 0: f1 = 2*1/(2+1); class 1: 2*1/(1+2); class 2: never true nor predicted
    scores = classification_scores([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    # a class that is only predicted counts, with F1 0
    only_predicted = classification_scores([[1, 1], [0, 0]])
    assert only_predicted["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert classification_scores([[0, 0], [0, 0]]) == {"accuracy": 0.0, "macro_f1": 0.0}
    assert classification_scores([]) == {"accuracy": 0.0, "macro_f1": 0.0}
