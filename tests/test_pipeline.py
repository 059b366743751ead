"""`raylm run`'s decisions without Ray: the evaluation gate, reusing a finished run, and the
settings a rename must not turn into a change."""

from __future__ import annotations

import pytest

from raylm.errors import GateFailed, SettingsChanged
from raylm.job import spec_from_dict, training_settings
from raylm.pipeline import Winner, check_gate, check_reuse, gate_failures

from .conftest import tiny_job


def test_a_gate_passes_only_when_every_bound_holds():
    bounds = {"exact_match": {"min": 0.8}, "eval_loss": {"max": 2.0}}
    assert gate_failures(bounds, {"exact_match": 0.8, "eval_loss": 2.0}) == []  # bounds inclusive
    assert gate_failures({}, {"eval_loss": 9.0}) == []  # no gate
    low = gate_failures(bounds, {"exact_match": 0.79, "eval_loss": 1.0})
    assert len(low) == 1 and low[0].startswith("exact_match=0.79") and "below" in low[0]
    high = gate_failures(bounds, {"exact_match": 0.9, "eval_loss": 2.5})
    assert len(high) == 1 and high[0].startswith("eval_loss=2.5") and "above" in high[0]
    both = gate_failures({"eval_loss": {"min": 1.0, "max": 2.0}}, {"eval_loss": 0.5})
    assert len(both) == 1 and "below the minimum 1" in both[0]
    assert len(gate_failures(bounds, {"exact_match": 0.1, "eval_loss": 3.0})) == 2
    # A metric that was not evaluated (a preemption checkpoint's NaN) never passes a bound.
    nan = gate_failures(bounds, {"exact_match": float("nan"), "eval_loss": 1.0})
    assert len(nan) == 1 and nan[0].startswith("exact_match was not reported")


def test_a_metric_the_run_never_reported_fails_the_gate():
    out = gate_failures({"accuracy": {"min": 0.5}}, {"eval_loss": 1.0, "step": 10})
    assert len(out) == 1 and out[0].startswith("accuracy was not reported")
    assert "eval_loss" in out[0]  # names what the run did report
    # a non-number is not a report either
    assert gate_failures({"eval_loss": {"max": 1.0}}, {"eval_loss": None})


def test_check_gate_raises_with_every_failure_and_exit_code_3(tmp_path):
    spec = spec_from_dict(
        tiny_job(tmp_path, serve={"promote_if": {"eval_loss": {"max": 0.1}, "loss": {"max": 0.1}}})
    )
    winner = Winner("train", "ckpt", {"eval_loss": 0.5, "loss": 0.05}, "best")
    with pytest.raises(GateFailed) as info:
        check_gate(spec, winner)
    assert info.value.exit_code == 3 and len(info.value.failures) == 1
    assert info.value.failures[0].startswith("eval_loss=0.5")
    check_gate(spec, Winner("train", "ckpt", {"eval_loss": 0.05, "loss": 0.05}, "best"))


def _record(tmp_path, spec, settings) -> None:
    from raylm.checkpoint import run_uri
    from raylm.storage import join, write_json

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    write_json(
        join(run_uri(spec), "run.json"),
        {
            "stage": "train",
            "checkpoint": str(ckpt),
            "metrics": {"eval_loss": 1.0},
            "detail": "best",
            "settings": settings,
        },
    )


def test_a_finished_run_is_reused_unless_its_training_settings_changed(tmp_path):
    spec = spec_from_dict(tiny_job(tmp_path))
    assert check_reuse(spec, force=False) is None  # nothing finished yet
    _record(tmp_path, spec, training_settings(spec))
    assert check_reuse(spec, force=False)["stage"] == "train"
    assert check_reuse(spec, force=True) is None  # --force trains again
    # serving settings may change freely
    served = spec_from_dict(tiny_job(tmp_path, serve={"port": 9999}))
    assert check_reuse(served, force=False) is not None
    changed = spec_from_dict(tiny_job(tmp_path, training={"max_steps": 41}))
    with pytest.raises(SettingsChanged) as info:
        check_reuse(changed, force=False)
    assert "training.max_steps: 40 → 41" in str(info.value) and info.value.exit_code == 2


def test_a_run_recorded_under_the_old_eval_length_name_is_still_reused(tmp_path):
    spec = spec_from_dict(tiny_job(tmp_path))
    old = training_settings(spec)
    old["training"]["max_new_tokens"] = old["training"].pop("eval_max_new_tokens")
    _record(tmp_path, spec, old)
    assert check_reuse(spec, force=False) is not None
