"""Where a study logs: its MLflow tracking URI and experiment, one precedence for every command.

``samstudy study`` and ``samstudy export`` both call :func:`tracking_target`:

* URI: the command line, then the study file's ``tracking.tracking_uri``, then
  ``$MLFLOW_TRACKING_URI``, then ``sqlite:///<project root>/mlflow.db``; a relative sqlite path
  is taken from the project root (``samstudy.paths``), and the MLflow file store is refused;
* experiment: the command line, then the study file's ``tracking.experiment``, then the study name.
* spool cap (:func:`spool_max_mb`): the study file's ``tracking.spool_max_mb``, then
  ``$SAMSTUDY_SPOOL_MAX_MB``, then :data:`DEFAULT_SPOOL_MAX_MB`.

Secrets (a database password) come from the environment (``PGPASSWORD``, ``~/.pgpass``,
``MLFLOW_TRACKING_URI``) or the command line, never from a study file, which is committed:
a ``tracking_uri`` with a password there is refused. Every message shows URIs through
:func:`samstudy.paths.redact`.

:func:`study_settings` reads just what the export and the report need from a study file (its
``description`` and ``tracking:`` block), with the config loader, so they need neither the rest
of the study nor the study package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from samstudy import paths
from samstudy.configio import ConfigError, problems, read_yaml, report

DEFAULT_SPOOL_MAX_MB = 200.0  # the MLflow outbox's spool file (samstudy.study.outbox)
SPOOL_MAX_ENV = "SAMSTUDY_SPOOL_MAX_MB"


class TrackingError(ValueError):
    """A tracking set-up the platform refuses (for instance the MLflow file store)."""


class Tracking(BaseModel):
    """The ``tracking:`` block of a study file; both default to the conventions above."""

    model_config = ConfigDict(extra="forbid")

    experiment: str | None = Field(None, description="MLflow experiment; default: the study name")
    tracking_uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db"
    )
    spool_max_mb: float | None = Field(
        None,
        gt=0,
        description=f"cap of the MLflow spool file in MB; default: ${SPOOL_MAX_ENV}, else "
        f"{DEFAULT_SPOOL_MAX_MB:g}",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, uri: str | None) -> str | None:
        # A study file is committed and shared: a password there would be published.
        if uri is not None and paths.redact(uri) != uri:
            raise ValueError(
                f"{paths.redact(uri)!r} holds a password; a study file is no place for secrets: "
                "leave it out of the URI and set PGPASSWORD (or ~/.pgpass) in the environment, "
                "or pass the URI with --tracking-uri / MLFLOW_TRACKING_URI"
            )
        return uri


def spool_max_mb(tracking: Tracking | None = None) -> float:
    """The cap of a study's MLflow spool file in MB: ``tracking.spool_max_mb``, else
    ``$SAMSTUDY_SPOOL_MAX_MB``, else :data:`DEFAULT_SPOOL_MAX_MB`."""
    if tracking is not None and tracking.spool_max_mb is not None:
        return float(tracking.spool_max_mb)
    text = os.environ.get(SPOOL_MAX_ENV, "").strip()
    if not text:
        return DEFAULT_SPOOL_MAX_MB
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise TrackingError(
            f"{SPOOL_MAX_ENV}={text!r}: the spool cap must be a positive number of MB "
            f"(default {DEFAULT_SPOOL_MAX_MB:g})"
        )
    return value


def check_tracking_uri(uri: str, root: Path | None = None) -> str:
    """Refuse the file store (MLflow 3 deprecates it and raises) and absolutize sqlite paths."""
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {paths.redact(uri)!r} is the MLflow file store, which MLflow 3 refuses; use "
            f"{paths.default_tracking_uri(root)!r} (the default) or an MLflow server "
            "(http://HOST:PORT)"
        )
    return paths.absolute_sqlite_uri(uri, root)


def resolve_tracking_uri(
    explicit: str | None = None, study_uri: str | None = None, root: Path | None = None
) -> str:
    """The store, by the precedence of the module docstring (checked by :func:`check_tracking_uri`)."""
    return check_tracking_uri(paths.resolve_tracking_uri(explicit or study_uri, root), root)


def studies_dir(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``./studies`` when it exists, else ``<project root>/studies``."""
    if explicit:
        return Path(explicit)
    local = Path("studies")
    return local if local.is_dir() else paths.project_root() / "studies"


class StudySettings(BaseModel):
    """The parts of a study file that the export and the report read; the rest is not checked
    here (``samstudy plan`` validates the whole file)."""

    model_config = ConfigDict(extra="ignore")

    description: str = ""
    tracking: Tracking = Tracking()
    storage_path: str | None = None


def pending_spool(name: str, folder: str | Path | None = None, root: Path | None = None) -> int:
    """How many MLflow operations a run of study ``name`` could not send yet (its spool file,
    where ``samstudy study`` keeps them for its next run); 0 when there is none."""
    import json

    root = root or paths.project_root()
    storage = paths.resolve_storage_path(study_settings(name, folder).storage_path, root)
    spool = paths.spool_path(paths.experiment_path(storage, name), name, root)
    if not spool.is_file():
        return 0
    try:
        return len(json.loads(spool.read_text()).get("ops", []))
    except (OSError, ValueError):
        return 1  # unreadable: still something that did not reach MLflow


def study_settings(name: str, folder: str | Path | None = None) -> StudySettings:
    """:class:`StudySettings` of ``<folder>/NAME.yaml``; defaults when there is no such file.

    A file that is no valid YAML, or whose ``description`` / ``tracking`` are malformed, raises
    :class:`~samstudy.configio.ConfigError` naming the file and the field.
    """
    path = studies_dir(folder) / f"{name}.yaml"
    if not path.is_file():
        return StudySettings()
    data: Any = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (name:, base:, grid: ...)")
    try:
        return StudySettings.model_validate(
            {k: v for k, v in data.items() if k in StudySettings.model_fields and v is not None}
        )
    except ValidationError as exc:
        raise ConfigError(report(path, problems(exc, StudySettings))) from None


def tracking_target(
    name: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    tracking: Tracking | None = None,
    root: Path | None = None,
    writing: bool = True,
) -> tuple[str, str]:
    """(tracking URI, experiment) of study ``name``; ``tracking`` is its file's block.

    ``writing``: refuse the MLflow file store (a study writes; an export may still read one,
    where MLflow is told to allow it).
    """
    tracking = tracking or Tracking()
    if writing:
        uri = resolve_tracking_uri(tracking_uri, tracking.tracking_uri, root)
    else:
        uri = paths.resolve_tracking_uri(tracking_uri or tracking.tracking_uri, root)
    return uri, experiment or tracking.experiment or name
