"""raylm.job.settings: the training settings `raylm run` records and compares, their diff, and
renamed fields read under their current names."""

from __future__ import annotations

import json

from raylm.job import JobSpec, settings_diff, spec_from_dict, training_settings, upgrade_settings
from raylm.job.settings import NOT_TRAINING_SETTINGS, RENAMED


def test_training_settings_leave_out_serving_failure_and_shared_storage():
    spec = spec_from_dict(
        {"serve": {"port": 9000}, "failure": {"max_failures": 3}, "storage_shared": True}
    )
    settings = training_settings(spec)
    assert set(NOT_TRAINING_SETTINGS) == {"serve", "failure", "storage_shared"}
    assert not set(settings) & set(NOT_TRAINING_SETTINGS)
    assert set(settings) == set(JobSpec.model_fields) - set(NOT_TRAINING_SETTINGS)
    assert settings["training"] == spec.training.model_dump()
    assert settings["name"] == "job"


def test_settings_that_only_serving_changes_compare_equal():
    a = training_settings(spec_from_dict({"serve": {"port": 9000}, "failure": {"max_failures": 1}}))
    b = training_settings(spec_from_dict({"storage_shared": True}))
    assert settings_diff(a, b) == []
    c = training_settings(spec_from_dict({"training": {"lr": 0.01}}))
    assert settings_diff(a, c) == ["training.lr: 0.0003 → 0.01"]


def test_training_settings_are_plain_json_values():
    spec = JobSpec(deepspeed={"config": {"optimizer": {"betas": (0.8, 0.9)}}})
    settings = training_settings(spec)
    assert settings["deepspeed"]["config"]["optimizer"]["betas"] == [0.8, 0.9]
    # what is recorded reads back equal, so a resumed run never sees a spurious change
    assert json.loads(json.dumps(settings)) == settings


def test_diff_names_every_changed_leaf_by_its_dotted_path_in_sorted_order():
    old = {"b": 1, "a": {"x": 1, "y": {"z": "s"}, "same": 0}, "gone": True}
    new = {"b": 2, "a": {"x": 1, "y": {"z": "t"}, "same": 0}, "added": [1]}
    assert settings_diff(old, new) == [
        "a.y.z: 's' → 't'",
        "added: None → [1]",
        "b: 1 → 2",
        "gone: True → None",
    ]


def test_diff_keeps_changes_found_before_a_nested_section():
    old = {"a": 1, "b": {"x": 1, "y": {"z": 1}}, "c": 1}
    new = {"a": 2, "b": {"x": 2, "y": {"z": 2}}, "c": 2}
    assert settings_diff(old, new) == ["a: 1 → 2", "b.x: 1 → 2", "b.y.z: 1 → 2", "c: 1 → 2"]


def test_diff_of_equal_settings_is_empty_and_prefix_is_prepended():
    assert settings_diff({"a": {"b": 1}}, {"a": {"b": 1}}) == []
    assert settings_diff({"b": 1}, {"b": 2}, prefix="training.") == ["training.b: 1 → 2"]


def test_a_section_that_becomes_a_value_is_one_change():
    assert settings_diff({"tune": {"metric": "eval_loss"}}, {"tune": None}) == [
        "tune: {'metric': 'eval_loss'} → None"
    ]


def test_renamed_setting_is_read_under_its_new_name():
    assert RENAMED == {"training.max_new_tokens": "training.eval_max_new_tokens"}
    old = {"training": {"lr": 0.1, "max_new_tokens": 8}, "name": "x"}
    assert upgrade_settings(old) == {"training": {"lr": 0.1, "eval_max_new_tokens": 8}, "name": "x"}
    assert old == {"training": {"lr": 0.1, "max_new_tokens": 8}, "name": "x"}  # not changed


def test_a_rename_alone_is_no_change():
    spec = spec_from_dict({"training": {"eval_max_new_tokens": 8}})
    recorded = training_settings(spec)
    recorded["training"]["max_new_tokens"] = recorded["training"].pop("eval_max_new_tokens")
    assert settings_diff(recorded, training_settings(spec)) != []
    assert settings_diff(upgrade_settings(recorded), training_settings(spec)) == []


def test_settings_without_the_old_name_are_unchanged():
    old = {"training": {"eval_max_new_tokens": 4}, "model": {"max_new_tokens": 3}, "x": 1}
    assert upgrade_settings(old) == old
    assert upgrade_settings({"training": 5}) == {"training": 5}
    assert upgrade_settings({}) == {}


def test_a_rename_may_move_a_setting_to_another_section(monkeypatch):
    import raylm.job.settings as settings_module

    monkeypatch.setattr(settings_module, "RENAMED", {"model.old": "training.new"})
    old = {"model": {"old": 1, "keep": 2}}
    assert upgrade_settings(old) == {"model": {"keep": 2}, "training": {"new": 1}}
    assert old == {"model": {"old": 1, "keep": 2}}
    both = {"model": {"old": 1}, "training": {"lr": 0.1}}
    assert upgrade_settings(both) == {"model": {}, "training": {"lr": 0.1, "new": 1}}
    assert both == {"model": {"old": 1}, "training": {"lr": 0.1}}
