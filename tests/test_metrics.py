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
