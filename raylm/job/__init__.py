"""The job file: its sections (`sections`), cross-field checks (`checks`), loading with overrides
(`load`), the settings `raylm run` compares (`settings`) and the generated reference
(`reference`). Import what you need from here."""

from raylm.errors import JobSpecError
from raylm.job.load import (
    LOCAL_SOURCE_FIELDS,
    load_job,
    parse_overrides,
    serve_spec_from_dict,
    spec_from_dict,
)
from raylm.job.sections import (
    AutoscalingSpec,
    DataSpec,
    JobSpec,
    ModelSpec,
    ServeSpec,
    TrainingSpec,
    TuneSpec,
)
from raylm.job.settings import settings_diff, training_settings, upgrade_settings

__all__ = [
    "LOCAL_SOURCE_FIELDS",
    "AutoscalingSpec",
    "DataSpec",
    "JobSpec",
    "JobSpecError",
    "ModelSpec",
    "ServeSpec",
    "TrainingSpec",
    "TuneSpec",
    "load_job",
    "parse_overrides",
    "serve_spec_from_dict",
    "settings_diff",
    "spec_from_dict",
    "training_settings",
    "upgrade_settings",
]
