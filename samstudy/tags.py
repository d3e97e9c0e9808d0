"""The MLflow tag names and trial statuses of the samstudy layout, in one place.

Written by the study tracker (``samstudy.study``), read by the export (``samstudy.analysis``) and
by the synthetic-study helpers; the layout is described in docs/architecture.md.
"""

from __future__ import annotations

ROLE = "samstudy.role"  # "parent" (one run per study) or "trial" (one run per trial)
STUDY = "samstudy.study"
TRIAL_ID = "samstudy.trial_id"
VARIANT = "samstudy.variant"  # readable label of the config without the seed
VARIANT_ID = "samstudy.variant_id"  # hash of the config without the seed
SHA = "samstudy.study_sha256"
STATUS = "samstudy.status"
GIT = "samstudy.git_commit"
VERSION = "samstudy.version"
OVERRIDES = "samstudy.overrides"  # JSON of the paths this trial varies
TOTAL = "samstudy.trials"  # on the parent run: how many trials the study has (for status)
SET = "samstudy.set"  # on the parent run: JSON list of the study's --set assignments
NODE = "samstudy.node_id"
NODE_IP = "samstudy.node_ip"
HOSTNAME = "samstudy.hostname"
GPU_IDS = "samstudy.gpu_ids"  # the GPU ids Ray assigned the trial, "0,1"; "none" without one
DEVICE = "samstudy.device"  # the torch device the trainer took ("cpu", "cuda:0")
RETRIED = "samstudy.retried"
ERROR = "samstudy.error"  # a failed trial's "Type: message"; the traceback is ERROR_ARTIFACT
ERROR_TYPE = "samstudy.error_type"  # the exception's class name
RETRYABLE = "samstudy.retryable"  # "false" when the error could not succeed on retry
LAST_ERROR = "samstudy.last_error"  # the error of the latest retried attempt
SPOOL_CUT = "samstudy.spool_cut"  # epochs the MLflow spool could not keep (over its cap)
ERROR_ARTIFACT = "error.txt"
PARENT = "mlflow.parentRunId"  # MLflow's own: nests child runs under the study's run
NOTE = "mlflow.note.content"  # MLflow's own: the run's description in the UI

ROLE_PARENT = "parent"
ROLE_TRIAL = "trial"
ROLE_VARIANT = "variant"  # a summary run: one variant's seed aggregates (samstudy summarize)
# MLflow 3's own experiment tag: a model-training experiment opens on its runs table in the UI
# (an experiment without it may open on the GenAI overview).
EXPERIMENT_KIND = "mlflow.experimentKind"
KIND_MODEL_TRAINING = "custom_model_development"

# Trial statuses; `stopped` is a trial ended early by a scheduler (ASHA) before its last epoch;
# `interrupted` is a trial the driver left unfinished (its run KILLED until a rerun resumes it).
TERMINAL_STATUSES = ("completed", "diverged", "stopped", "failed")
# Outcomes that count as done: a rerun does not start these trials again.
DONE_STATUSES = ("completed", "diverged", "stopped")
INTERRUPTED = "interrupted"
