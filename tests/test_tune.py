"""Sweep building blocks without running a sweep: param space, scheduler, ranking, report."""

from __future__ import annotations

import os

from raylm.job import spec_from_dict
from raylm.report import format_sweep_table, write_sweep_report
from raylm.tuning.sweep import build_param_space, build_trial_scheduler


def sweep_spec(**tune):
    return spec_from_dict(
        {
            "training": {"eval_every": 10, "max_steps": 90},
            "tune": {
                "search": {
                    "training.lr": {"loguniform": [1e-5, 1e-2]},
                    "lora.r": {"grid": [4, 8]},
                    "lora.alpha": {"choice": [8, 16]},
                    "training.weight_decay": {"uniform": [0, 0.1]},
                },
                **tune,
            },
        }
    )


def test_param_space_maps_each_kind_to_tune():
    from ray.tune.search.sample import Categorical, Float

    space = build_param_space(sweep_spec())
    lr = space["training.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-2)
    assert space["lora.r"] == {"grid_search": [4, 8]}
    assert isinstance(space["lora.alpha"], Categorical) and space["lora.alpha"].categories == [
        8,
        16,
    ]
    assert isinstance(space["training.weight_decay"], Float)


def test_asha_runs_on_optimizer_steps():
    asha = build_trial_scheduler(sweep_spec(reduction_factor=3))
    assert asha._time_attr == "step" and asha._max_t == 90
    # Rungs from the grace period (the first eval, by default) × reduction factor up to max_t.
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [10, 30, 90]
    assert build_trial_scheduler(sweep_spec(scheduler="none")) is None


def test_report_ranks_and_plots(tmp_path):
    rows = [
        {
            "trial_id": "a",
            "training.lr": 1e-3,
            "lora.r": 8,
            "eval_loss": 1.2,
            "best_step": 90,
            "step": 90,
            "total_steps": 90,
            "status": "finished",
            "checkpoint": "/x",
            "curve": [[0, 3.0], [90, 1.2]],
        },
        {
            "trial_id": "b",
            "training.lr": 1e-6,
            "lora.r": 4,
            "eval_loss": 2.9,
            "best_step": 10,
            "step": 10,
            "total_steps": 90,
            "status": "stopped early",
            "checkpoint": "/y",
            "curve": [[0, 3.0], [10, 2.9]],
        },
    ]
    files = write_sweep_report(str(tmp_path), rows, "eval_loss", ["training.lr", "lora.r"])
    assert all(os.path.getsize(f) > 0 for f in files.values())
    table = format_sweep_table(rows, "eval_loss", ["training.lr", "lora.r"])
    assert table.splitlines()[2].split()[:2] == ["1", "a"]
    assert "stopped early" in table.splitlines()[3] and "10/90" in table
