"""raylm.job.tree: the one deep merge and `nest`."""

from __future__ import annotations

from raylm.job.tree import deep_merge, nest


def test_dicts_merge_key_by_key_and_anything_else_replaces():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1, 2], "c": 3}
    extra = {"a": {"y": {"q": 20, "r": 30}, "z": 4}, "b": [9], "d": 5}
    assert deep_merge(base, extra) == {
        "a": {"x": 1, "y": {"p": 1, "q": 20, "r": 30}, "z": 4},
        "b": [9],
        "c": 3,
        "d": 5,
    }


def test_a_dict_replaces_a_plain_value_and_a_plain_value_replaces_a_dict():
    assert deep_merge({"a": 1}, {"a": {"x": 1}}) == {"a": {"x": 1}}
    assert deep_merge({"a": {"x": 1}}, {"a": 2}) == {"a": 2}
    assert deep_merge({"a": {"x": 1}}, {"a": None}) == {"a": None}
    assert deep_merge({"a": {"x": 1}, "b": 2}, {"a": {}}) == {"a": {}, "b": 2}  # {} empties


def test_merge_with_nothing_is_an_equal_copy():
    base = {"a": {"b": [1]}}
    out = deep_merge(base, {})
    assert out == base and out is not base
    assert out["a"] is not base["a"] and out["a"]["b"] is not base["a"]["b"]


def test_neither_argument_changes_and_the_result_shares_nothing_with_them():
    base = {"a": {"x": [1]}, "k": [0]}
    extra = {"a": {"y": [2], "n": {"m": [3]}}, "l": [4]}
    out = deep_merge(base, extra)
    assert base == {"a": {"x": [1]}, "k": [0]}
    assert extra == {"a": {"y": [2], "n": {"m": [3]}}, "l": [4]}
    out["a"]["x"].append(9)
    out["a"]["y"].append(9)
    out["a"]["n"]["m"].append(9)
    out["k"].append(9)
    out["l"].append(9)
    assert base == {"a": {"x": [1]}, "k": [0]}
    assert extra == {"a": {"y": [2], "n": {"m": [3]}}, "l": [4]}


def test_nest_builds_the_path_outside_in():
    assert nest(["a"], 1) == {"a": 1}
    assert nest(["a", "b", "c"], [1]) == {"a": {"b": {"c": [1]}}}
    assert deep_merge({"a": {"b": {"c": 0, "d": 1}}}, nest(["a", "b", "c"], 5)) == {
        "a": {"b": {"c": 5, "d": 1}}
    }
