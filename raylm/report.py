"""Reports a person can read: a training run's metrics.jsonl and loss-curve PNG beside its
checkpoints, and a sweep's ranked table, results.csv/json, heatmap and eval-curve PNGs."""

from __future__ import annotations

import json
import os
from typing import Any

from raylm.tasks import METRICS

# Eval scores in [0, 1] drawn beside the loss curves, when a run reports them.
SCORES = tuple(name for name, m in METRICS.items() if m.score)


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
    """Training loss and eval loss against step, and the 0–1 scores the task reports (exact
    match, accuracy, macro-F1, entity F1) on a second axis."""
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
    scores = {name: [(r["step"], r[name]) for r in history if name in r] for name in SCORES}
    scores = {name: points for name, points in scores.items() if points}
    if scores:
        ax2 = ax.twinx()
        for (name, points), color in zip(
            scores.items(), ("tab:green", "tab:purple", "tab:red"), strict=False
        ):
            ax2.plot(
                *zip(*points, strict=True), color=color, label=name.replace("_", " "), marker="s"
            )
        ax2.set_ylabel(" / ".join(n.replace("_", " ") for n in scores))
        ax2.set_ylim(0, 1.02)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # One legend, mid-height on the right: loss falls and accuracy rises away from it.
    ax.legend(handles, labels, loc="center right")
    ax.set_title("raylm training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_sweep_table(rows: list[dict[str, Any]], metric: str, params: list[str]) -> str:
    """The ranked trials as a text table: rank, trial, searched values, metric, steps, status."""
    header = ["#", "trial", *params, metric, "steps", "status"]
    body = [
        [
            str(i + 1),
            r["trial_id"],
            *(_short(r.get(p)) for p in params),
            _short(r.get(metric)) if r.get(metric) is not None else "-",
            f"{r.get('step', 0)}/{r.get('total_steps', '?')}",
            r.get("status", "?"),
        ]
        for i, r in enumerate(rows)
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_sweep_report(
    out_dir: str, rows: list[dict[str, Any]], metric: str, params: list[str]
) -> dict[str, str]:
    """Writes results.csv, results.json, heatmap.png and curves.png into `out_dir`; returns
    their paths."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    files = {
        k: os.path.join(out_dir, f)
        for k, f in (
            ("csv", "results.csv"),
            ("json", "results.json"),
            ("heatmap", "heatmap.png"),
            ("curves", "curves.png"),
        )
    }
    columns = [
        "rank",
        "trial_id",
        *params,
        metric,
        "best_step",
        "step",
        "total_steps",
        "status",
        "checkpoint",
    ]
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for i, r in enumerate(rows):
            writer.writerow({"rank": i + 1, **r})
    with open(files["json"], "w") as f:
        json.dump([{"rank": i + 1, **r} for i, r in enumerate(rows)], f, indent=2, default=str)
    plot_sweep_heatmap(rows, metric, params, files["heatmap"])
    plot_sweep_curves(rows, metric, files["curves"])
    return files


def _axis(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers plot as themselves; anything else (files, names) as evenly spaced categories."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({os.path.basename(str(v)) or str(v) for v in values})
    return [float(labels.index(os.path.basename(str(v)) or str(v))) for v in values], labels


def plot_sweep_heatmap(
    rows: list[dict[str, Any]], metric: str, params: list[str], path: str
) -> None:
    """The metric over the first two searched fields (a log axis for learning rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    x_name = params[0]
    y_name = params[1] if len(params) > 1 else None
    xs, x_labels = _axis([r[x_name] for r in scored])
    ys, y_labels = _axis([r[y_name] for r in scored]) if y_name else ([0.0] * len(scored), None)
    values = [r[metric] for r in scored]
    points = ax.scatter(xs, ys, c=values, s=600, marker="s", cmap="viridis_r")
    for x, y, v in zip(xs, ys, values, strict=True):
        ax.annotate(f"{v:.3g}", (x, y), ha="center", va="center", fontsize=8, color="white")
    if "lr" in x_name and x_labels is None and xs and min(xs) > 0:
        ax.set_xscale("log")
    if x_labels:
        ax.set_xticks(range(len(x_labels)), x_labels, rotation=15, fontsize=7)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name or "")
    if y_labels:
        ax.set_yticks(range(len(y_labels)), y_labels, fontsize=7)
    elif y_name:
        ax.set_yticks(sorted(set(ys)))
    fig.colorbar(points, ax=ax, label=metric)
    ax.set_title(f"sweep: {metric} by trial")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep_curves(rows: list[dict[str, Any]], metric: str, path: str) -> None:
    """Each trial's eval curve; trials ASHA stopped early end in a red cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in rows:
        curve = r.get("curve") or []
        if not curve:
            continue
        steps, values = zip(*curve, strict=True)
        ax.plot(steps, values, marker=".", label=f"{r['trial_id']} ({r.get('status')})")
        if r.get("status") == "stopped early":
            ax.plot(steps[-1], values[-1], "x", color="red", markersize=12, mew=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep: {metric} per trial (x = stopped early by ASHA)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
