"""The job file's `serve` section and its `serve.autoscaling`: how a checkpoint is served."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raylm.errors import Problem, raise_problems
from raylm.job.base import Section
from raylm.tasks import METRICS


class AutoscalingSpec(Section):
    """Ray Serve's `autoscaling_config`, same names; unset fields keep Serve's defaults."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="In-flight requests per replica the autoscaler aims for (Serve: 2)."
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, description="Load must stay high this long before adding replicas (Serve: 30)."
    )
    downscale_delay_s: float | None = Field(
        None,
        ge=0,
        description="Load must stay low this long before removing replicas (Serve: 600).",
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas report load (Serve: 10)."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window the load is averaged over (Serve: 30)."
    )
    upscaling_factor: float | None = Field(
        None, gt=0, description="Multiplier on each upscale step."
    )
    downscaling_factor: float | None = Field(
        None, gt=0, description="Multiplier on each downscale step."
    )

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        problems: list[Problem] = []
        if self.min_replicas > self.max_replicas:
            problems.append(
                (
                    ["min_replicas"],
                    self.min_replicas,
                    f"must be <= max_replicas ({self.max_replicas})",
                )
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            problems.append(
                (
                    ["initial_replicas"],
                    self.initial_replicas,
                    f"must lie in [min_replicas, max_replicas] = "
                    f"[{self.min_replicas}, {self.max_replicas}]",
                )
            )
        raise_problems("AutoscalingSpec", problems)
        return self

    def to_serve(self) -> dict[str, Any]:
        """The dict Serve's `autoscaling_config` takes (unset fields left to Serve)."""
        return self.model_dump(exclude_none=True)


class ServeSpec(Section):
    """Serving settings for `raylm serve`: replicas, batching, limits, auth, address."""

    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once (must fit a full batch)."
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests waiting per caller before Serve answers 503 (default: no limit).",
    )
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per replica.")
    max_batch_size: int = Field(8, ge=1, description="Requests batched per `generate` call.")
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0.0,
        le=10.0,
        description="While other requests are in flight, wait up to this "
        "long for a batch to fill; a request reaching an idle replica starts at once.",
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: greedy requests join transformers' running batch between "
        "decode steps and leave when done (sampled, scored or multi-adapter requests batch "
        "statically); static: `serve.batch` groups requests into one `generate` call that runs "
        "to its longest answer.",
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts are refused (400).")
    max_new_tokens: int = Field(
        256, ge=1, description="Largest `max_tokens` a request may ask for."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    max_n: int = Field(
        8, ge=1, le=128, description="Most answers one request may ask for (`n` × prompts)."
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Env var holding the API key; when set, requests need "
        "`Authorization: Bearer KEY`.",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 for all).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="Where Serve runs HTTP proxies: on every node with a replica (Ray's default; "
        "with host 0.0.0.0 a load balancer in front can spread clients over them) or on the "
        "head only.",
    )
    multi_lora: bool = Field(
        True,
        description="Serving a swept job also serves its top-k trial adapters "
        "(model `<job>-<trial>`) beside the winner.",
    )
    promote_if: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Gate on metrics, e.g. {eval_loss: {max: 2.0}}."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeSpec:
        problems: list[Problem] = []
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append(
                (
                    ["max_ongoing_requests"],
                    self.max_ongoing_requests,
                    f"must be >= max_batch_size ({self.max_batch_size}) or batches never fill",
                )
            )
        for metric, bounds in self.promote_if.items():
            if metric not in METRICS:
                problems.append(
                    (["promote_if", metric], bounds, f"unknown metric; one of {sorted(METRICS)}")
                )
            bad = sorted(set(bounds) - {"min", "max"})
            if bad or not bounds:
                problems.append((["promote_if", metric], bounds, "needs {min: x} and/or {max: y}"))
        raise_problems("ServeSpec", problems)
        return self
