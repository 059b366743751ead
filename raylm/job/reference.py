"""The job-file reference as Markdown, generated from the section models' field descriptions
(the README's reference section is kept identical to it by a test)."""

from __future__ import annotations

import json

from raylm.job.sections import (
    AutoscalingSpec,
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    FailureSpec,
    JobSpec,
    LoraSpec,
    ModelSpec,
    ScalingSpec,
    Section,
    ServeSpec,
    TrainingSpec,
    TuneSpec,
)


def reference_markdown() -> str:
    """The job-file reference as Markdown tables, generated from the field descriptions."""
    lines: list[str] = []
    top = [
        (n, f)
        for n, f in JobSpec.model_fields.items()
        if not (isinstance(f.annotation, type) and issubclass(f.annotation, Section))
        and n not in ("tune", "serve")
    ]
    lines += ["| field | default | description |", "|---|---|---|"]
    lines += [f"| `{n}` | `{f.default}` | {f.description} |" for n, f in top]
    sections = [
        ("model", ModelSpec),
        ("data", DataSpec),
        ("lora", LoraSpec),
        ("training", TrainingSpec),
        ("deepspeed", DeepSpeedSpec),
        ("scaling", ScalingSpec),
        ("checkpoint", CheckpointSpec),
        ("failure", FailureSpec),
        ("tune", TuneSpec),
        ("serve", ServeSpec),
        ("serve.autoscaling", AutoscalingSpec),
    ]
    for name, model in sections:
        doc = f" — {model.__doc__.strip()}" if model.__doc__ else ""
        lines += [
            "",
            f"**`{name}`**{doc}",
            "",
            "| field | default | description |",
            "|---|---|---|",
        ]
        for field_name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, Section):
                continue  # a nested section gets its own table
            default = f.default_factory() if f.default_factory is not None else f.default
            shown = json.dumps(default) if not isinstance(default, str) else default
            shown = shown.replace("\n", "\\n").replace("|", "\\|")
            lines.append(f"| `{name}.{field_name}` | `{shown}` | {f.description} |")
    return "\n".join(lines) + "\n"
