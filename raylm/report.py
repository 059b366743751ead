"""Run reports a person can read: metrics.jsonl and a loss-curve PNG beside the checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any


def write_train_report(run_dir: str, history: list[dict[str, Any]]) -> dict[str, str]:
    """Writes `metrics.jsonl` and `loss_curve.png` into `run_dir`; returns their paths.

    Only local run dirs get a report: cloud URIs are left to the user's own tooling.
    """
    if "://" in run_dir or not history:
        return {}
    os.makedirs(run_dir, exist_ok=True)
    jsonl = os.path.join(run_dir, "metrics.jsonl")
    with open(jsonl, "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    png = os.path.join(run_dir, "loss_curve.png")
    plot_loss_curve(history, png)
    return {"metrics": jsonl, "plot": png}


def plot_loss_curve(history: list[dict[str, Any]], path: str) -> None:
    """Training loss and eval loss against step (and exact match on a second axis if present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    em = [(r["step"], r["exact_match"]) for r in history if "exact_match" in r]
    if em:
        ax2 = ax.twinx()
        ax2.plot(*zip(*em, strict=True), color="tab:green", label="exact match", marker="s")
        ax2.set_ylabel("exact match")
        ax2.set_ylim(0, 1.02)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # One legend, mid-height on the right: loss falls and accuracy rises away from it.
    ax.legend(handles, labels, loc="center right")
    ax.set_title("raylm training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
