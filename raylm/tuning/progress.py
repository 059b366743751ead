"""Live sweep progress on the console: one line per trial eval and per trial end."""

from __future__ import annotations

import math
from typing import Any

from raylm.job import JobSpec


def sweep_progress(spec: JobSpec) -> Any:
    """A Tune callback printing one line per trial eval and per trial end, with counts and the
    best so far."""
    from ray.tune import Callback

    tu = spec.tune
    assert tu is not None
    sign = 1 if tu.mode == "min" else -1

    class SweepProgress(Callback):
        """One line per trial eval and per trial end: counts and the best so far."""

        def __init__(self) -> None:
            self.best: tuple[float, str] | None = None
            self.ended: dict[str, str] = {}

        def _counts(self, trials: list[Any]) -> str:
            running = sum(t.status == "RUNNING" for t in trials)
            stopped = sum(v == "stopped early" for v in self.ended.values())
            best = f" | best {tu.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
            return (
                f"running {running}, finished {len(self.ended) - stopped}, "
                f"stopped early {stopped} of {len(trials)}{best}"
            )

        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any
        ) -> None:
            value = result.get(tu.metric)
            if value is None:
                return
            if self.best is None or sign * value < sign * self.best[0]:
                self.best = (value, trial.trial_id)
            print(
                f"[raylm tune] trial {trial.trial_id} step {result.get('step')}/"
                f"{result.get('total_steps')} {tu.metric} {value:.4f} | {self._counts(trials)}",
                flush=True,
            )

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            last = trial.last_result or {}
            done = last.get("step", 0) >= last.get("total_steps", math.inf)
            self.ended[trial.trial_id] = "finished" if done else "stopped early"
            print(
                f"[raylm tune] trial {trial.trial_id} {self.ended[trial.trial_id]} at step "
                f"{last.get('step')} | {self._counts(trials)}",
                flush=True,
            )

        def on_trial_error(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            self.ended[trial.trial_id] = "error"
            print(
                f"[raylm tune] trial {trial.trial_id} failed | {self._counts(trials)}", flush=True
            )

    return SweepProgress()
