"""Study files: the schema of ``studies/NAME.yaml`` and its loading. Long because it is the whole
study-file schema, with the validators that need the expanded trials, in one place.

A study file is validated completely before anything is launched: the schema (pydantic, unknown
keys refused), every grid path, and every expanded trial config (``TrialConfig``, which runs the
optimizer's own checks). Every problem is a :class:`StudyError` naming the file, the field path
and what is allowed. Expansion into trials lives in ``samstudy.study.expand``; the grammar is
documented in ``docs/studies.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from samstudy.analysis.comparisons import AnalysisSpec, reference_problems
from samstudy.configio import ConfigError, apply_override, problems, read_yaml, report
from samstudy.configpath import unknown_key_message
from samstudy.identity import identify
from samstudy.settings import Tracking
from samstudy.study.storage import check_endpoint, credential_fields, credential_message
from samstudy.train.config import EPOCH_METRICS, TrialConfig

# Metric names a search may optimise (the trainer's per-epoch metrics).
METRICS = EPOCH_METRICS


class StudyError(Exception):
    """A study file that cannot run; the message names file, field path and allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Checkpoints(_Strict):
    """Which checkpoints a study keeps in its storage (fixed when the study first starts)."""

    # Any value resumes after a driver killed outright: an older checkpoint goes only once
    # Tune's saved state no longer names it (pruning.py).
    keep: int = Field(2, ge=1, description="checkpoints kept per running trial (the latest)")
    keep_final: bool = Field(
        False, description="keep a finished trial's last checkpoint (its final weights)"
    )


class Resources(_Strict):
    """Ray resources of one trial; fractional GPUs let small trials share a GPU."""

    cpus: float = Field(1.0, gt=0, description="CPUs per trial (fractions allowed)")
    gpus: float = Field(0.0, ge=0, description="GPUs per trial: 0, a fraction below 1, or whole")

    @field_validator("cpus", "gpus")
    @classmethod
    def _ray_precision(cls, value: float) -> float:
        # Ray keeps resource amounts in units of 1e-4 and refuses finer fractions.
        if abs(round(value * 1e4) - value * 1e4) > 1e-6:
            raise ValueError(f"{value} is finer than Ray's resource precision of 0.0001")
        return value

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        # A trial process drives one device; 1.5 GPUs would reserve half a GPU nobody uses.
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"{value}: use a fraction below 1 (GPU sharing) or a whole number")
        return value


class ParamSpec(_Strict):
    """One search dimension: a float or int range (optionally log-scaled) or categorical values."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.values:
                raise ValueError("type 'categorical' needs a non-empty 'values' list")
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("type 'categorical' takes only 'values' (no low/high/log)")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type!r} takes low/high, not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type!r} needs both 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"needs low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low}")
        if self.type == "int" and not (
            float(self.low).is_integer() and float(self.high).is_integer()
        ):
            raise ValueError(f"type 'int' needs whole low/high, got {self.low}, {self.high}")
        return self

    def admits(self, value: Any) -> bool:
        """Whether ``value`` lies in this dimension (a points_to_evaluate entry)."""
        if self.type == "categorical":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return float(self.low) <= value <= float(self.high)  # type: ignore[arg-type]

    def allowed(self) -> str:
        """The dimension in words, for errors."""
        if self.type == "categorical":
            return "one of " + ", ".join(json.dumps(v) for v in self.values or [])
        return f"{self.type} in [{self.low}, {self.high}]"

    def corners(self) -> list[Any]:
        """The extreme values (or every categorical value): what must form valid trials."""
        if self.type == "categorical":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [float(self.low), float(self.high)]  # type: ignore[arg-type]


class AshaSpec(_Strict):
    """ASHA early stopping (Ray Tune's ASHAScheduler); time unit: epochs."""

    max_t: int | None = Field(None, ge=1, description="default: base.epochs")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class SearchSpec(_Strict):
    """Optuna search through Ray Tune (OptunaSearch): TPE or random sampling."""

    algorithm: Literal["tpe", "random"] = "tpe"
    metric: str = "best_test_acc"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(..., ge=1)
    seed: int = 0
    params: dict[str, ParamSpec]
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="points run first, each a value for every param (e.g. a reference trial)",
    )
    asha: AshaSpec | None = None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            raise ValueError(unknown_key_message(metric, METRICS, "metric"))
        return metric

    @field_validator("params")
    @classmethod
    def _some_params(cls, params: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not params:
            raise ValueError("a search needs at least one parameter")
        return params

    @field_validator("points_to_evaluate")
    @classmethod
    def _points_in_space(
        cls, points: list[dict[str, Any]], info: ValidationInfo
    ) -> list[dict[str, Any]]:
        params: dict[str, ParamSpec] = info.data.get("params") or {}
        for i, point in enumerate(points):
            missing = [p for p in params if p not in point]
            extra = [p for p in point if p not in params]
            if missing or extra:
                raise ValueError(
                    f"[{i}]: give a value for every param and nothing else"
                    + (f"; missing: {', '.join(missing)}" if missing else "")
                    + (f"; not a param: {', '.join(extra)}" if extra else "")
                )
            for path, value in point.items():
                if not params[path].admits(value):
                    raise ValueError(
                        f"[{i}].{path}: {value!r} is outside the param's range "
                        f"({params[path].allowed()})"
                    )
        if len(points) > info.data.get("num_samples", len(points)):
            raise ValueError(
                f"{len(points)} points exceed num_samples ({info.data['num_samples']})"
            )
        return points


@dataclass(frozen=True)
class TrialSpec:
    """One expanded trial: the unit Ray Tune runs and MLflow records.

    ``variant`` / ``variant_id`` identify its configuration without the seed
    (``samstudy.identity``); they are decided once, here, and travel to MLflow and Parquet.
    """

    trial_id: str
    name: str
    config: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    variant_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (what travels through Ray Tune's param space)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialSpec:
        """Inverse of :meth:`to_dict`; a trial of an older version gets its variant here."""
        data = dict(data)
        if not data.get("variant_id"):
            ident = identify(data["config"], data.get("overrides"))
            data["variant"], data["variant_id"] = ident["variant"], ident["variant_id"]
        return cls(**data)


class StudySpec(_Strict):
    """A validated study file. ``path`` and ``sha256`` identify the file it came from."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: TrialConfig = Field(default_factory=TrialConfig)
    grid: Any = None  # shape checked by _check_grid, with paths in the messages
    seeds: list[int] | None = None
    repeats: int | None = Field(None, ge=1)
    search: SearchSpec | None = None
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, ge=1)
    tracking: Tracking = Tracking()
    storage_path: str | None = None
    storage_endpoint: str | None = Field(
        None,
        description="endpoint of an S3-compatible store for an s3:// storage_path, "
        "http(s)://HOST:PORT; default $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS",
    )
    # Each checkpoint handed to Tune costs a round trip to its driver and, every few, a snapshot
    # of its experiment state: for epochs of milliseconds that outweighs what a retry would redo.
    checkpoint_min_s: float = Field(
        10.0, ge=0, description="seconds of a trial's run between checkpoints kept; 0 = every one"
    )
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)  # what the report compares

    _base_raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _path: Path = PrivateAttr(default=Path("<memory>"))
    _sha256: str = PrivateAttr(default="")
    _trials: list[TrialSpec] | None = PrivateAttr(default=None)
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_base(cls, data: Any, handler: Any) -> StudySpec:
        # Grid values merge into what the user wrote, not the defaults-filled base: a block
        # `optimizer: {base: adamw}` must not inherit SGD's momentum default.
        spec = handler(data)
        raw = data.get("base") if isinstance(data, dict) else None
        spec._base_raw = copy.deepcopy(raw) if isinstance(raw, dict) else {}
        return spec

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # Study files are committed: keys come from the environment and ~/.aws only.
        found = credential_fields(data)
        if found:
            raise ValueError(credential_message(found))
        return data

    @field_validator("storage_endpoint")
    @classmethod
    def _endpoint_ok(cls, url: str | None) -> str | None:
        return None if url is None else check_endpoint(url)

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None:
            if not seeds:
                raise ValueError("seeds is empty; give at least one seed or leave it out")
            dupes = sorted({s for s in seeds if seeds.count(s) > 1})
            if dupes:
                raise ValueError(f"seeds repeats {dupes}; each seed once")
        return seeds

    @model_validator(mode="after")
    def _exclusive(self) -> StudySpec:
        if self.seeds is not None and self.repeats is not None:
            raise ValueError("seeds, repeats: give either seeds (a list) or repeats (a count)")
        if self.search is not None:
            if self.grid is not None:
                raise ValueError("grid, search: a study has either a grid or a search, not both")
            if self.seeds is not None or self.repeats is not None:
                raise ValueError("seeds, repeats: a search samples points; set base.seed instead")
            asha = self.search.asha
            if asha is not None and asha.max_t is not None and asha.max_t > self.base.epochs:
                raise ValueError(
                    f"search.asha.max_t: {asha.max_t} exceeds base.epochs ({self.base.epochs})"
                )
        return self

    # -- identity ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The study file (``<memory>`` for a spec built from a mapping)."""
        return self._path

    @property
    def sha256(self) -> str:
        """sha256 of the study file's bytes."""
        return self._sha256

    @property
    def overrides(self) -> list[str]:
        """The ``--set KEY.PATH=VALUE`` assignments applied to ``base`` when it was loaded."""
        return list(self._overrides)

    @property
    def base_raw(self) -> dict[str, Any]:
        """The ``base:`` mapping as written (grid values merge into this)."""
        return copy.deepcopy(self._base_raw)

    @property
    def experiment(self) -> str:
        """MLflow experiment name (``samstudy.settings.tracking_target``'s rule, without a
        command line): ``tracking.experiment`` or the study name."""
        return self.tracking.experiment or self.name

    @property
    def seed_list(self) -> list[int] | None:
        """The seeds every configuration is crossed with (None: the base seed only)."""
        if self.seeds is not None:
            return list(self.seeds)
        if self.repeats is not None:
            return list(range(self.repeats))
        return None

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """The grid as a list of blocks (a study without grid is one empty block: one trial)."""
        if self.grid is None:
            return [{}]
        return list(self.grid) if isinstance(self.grid, list) else [self.grid]

    # -- trials -----------------------------------------------------------------------------

    def trial_from_overrides(self, overrides: dict[str, Any]) -> TrialSpec:
        """Validate ``base`` with ``overrides`` (dotted path -> value) applied; one trial.

        Raises ``ValueError`` (a ``PathError`` for a bad path, pydantic's ``ValidationError``
        for a bad value); :meth:`expand` turns these into :class:`StudyError`.
        """
        from samstudy.study.expand import trial_from_overrides

        return trial_from_overrides(self, overrides)

    def expand(self) -> list[TrialSpec]:
        """Every trial of a grid study, validated; seeds vary slowest (see docs/studies.md).

        For a search study this is the single base trial (what ``plan`` prices per sample).
        """
        if self._trials is None:
            from samstudy.study.expand import expand

            self._trials = expand(self)
        return list(self._trials)


# -- loading ---------------------------------------------------------------------------------


def study_error(path: str | Path, lines: list[str]) -> StudyError:
    """A :class:`StudyError` with one ``path: problem`` line per problem (cut short)."""
    return StudyError(report(path, lines))


def resolve_study_path(name_or_path: str | Path, studies_dir: str | Path = "studies") -> Path:
    """A bare name means ``<studies_dir>/NAME.yaml``; a path may leave out ``.yaml``."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    if candidate.parent != Path("."):
        return candidate.with_name(candidate.name + ".yaml")  # studies/quickstart
    return Path(studies_dir) / f"{candidate.name}.yaml"


def load_study(
    name_or_path: str | Path, studies_dir: str | Path = "studies", overrides: Sequence[str] = ()
) -> StudySpec:
    """Load and fully validate a study: a bare name means ``<studies_dir>/NAME.yaml``.

    ``overrides`` are ``KEY.PATH=VALUE`` assignments (``--set``) applied to ``base:`` before
    validation, with the paths and value rules of ``samstudy train --set``. Grid studies are
    expanded (every trial config validated) here, so a returned spec can run.
    """
    path = resolve_study_path(name_or_path, studies_dir)
    if not path.is_file():
        available = sorted(p.stem for p in Path(studies_dir).glob("*.yaml"))
        hint = f"; studies in {studies_dir}/: {', '.join(available)}" if available else ""
        raise StudyError(f"{path}: no such study file{hint}")
    try:
        data = read_yaml(path)
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    if data is None:
        raise StudyError(f"{path}: the file is empty; a study needs at least 'name' and 'base'")
    if overrides and isinstance(data, dict):
        base = data.get("base") if data.get("base") is not None else {}
        if not isinstance(base, dict):
            raise StudyError(f"{path}: base: expected a mapping (the trial config), got {base!r}")
        data["base"] = base
        defaults = TrialConfig().model_dump(mode="json")
        try:
            for assignment in overrides:
                apply_override(base, assignment, TrialConfig, defaults)
        except ConfigError as exc:
            raise StudyError(str(exc)) from None
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = study_from_mapping(data, path=path, sha256=sha256)
    spec._overrides = list(overrides)
    if spec.name != path.stem:
        raise StudyError(
            f"{path}: name: {spec.name!r} differs from the file name {path.name!r}; "
            f"use name: {path.stem} (the name keys the MLflow experiment and the Ray storage, "
            "so a copied file must not reuse it)"
        )
    return spec


def study_from_mapping(
    data: Any, path: str | Path = "<memory>", sha256: str | None = None
) -> StudySpec:
    """Validate a study given as a mapping (``load_study`` without the file); expands it too."""
    from samstudy.study.expand import check_search

    path = Path(path)
    if not isinstance(data, dict):
        raise StudyError(
            f"{path}: the top level must be a mapping (name:, base:, grid: ...), "
            f"got {type(data).__name__}"
        )
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise study_error(path, problems(exc, StudySpec)) from None
    spec._path = path
    spec._sha256 = (
        sha256 or hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    )
    if spec.search is not None:
        check_search(spec)
    spec.expand()
    block = data.get("analysis")
    if spec.search is None and isinstance(block, dict) and "references" in block:
        trials = [t.config for t in spec.expand()]  # a search's trials are sampled later
        lines = reference_problems(trials, spec.analysis.references)
        if lines:
            raise study_error(path, lines)
    return spec
