"""Studies: YAML study files, their expansion into trials, the Ray Tune runner, MLflow tracking.

Importing this package loads only the study-file schema (pydantic + the trial config); the
runner and tracker (Ray, MLflow) are imported by the CLI when a study runs.
"""

from samstudy.identity import flatten_config, run_name, trial_id
from samstudy.study.plan import estimate_cost, format_plan
from samstudy.study.spec import (
    SearchSpec,
    StudyError,
    StudySpec,
    TrialSpec,
    load_study,
    study_from_mapping,
)

__all__ = [
    "SearchSpec",
    "StudyError",
    "StudySpec",
    "TrialSpec",
    "estimate_cost",
    "flatten_config",
    "format_plan",
    "load_study",
    "run_name",
    "study_from_mapping",
    "trial_id",
]
