"""Study files: schema, loading, validation and expansion into trials.

A study file (``studies/NAME.yaml``) is validated completely before anything is launched: the
schema (pydantic, unknown keys refused), every grid path, and every expanded trial config
(``TrialConfig``, which runs the optimizer's own checks). Every problem is a :class:`StudyError`
naming the file, the field path and what is allowed. The grammar is documented in
``docs/studies.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from samstudy.configpath import (
    PathError,
    check_path,
    fields_at,
    parse_path,
    set_path,
    unknown_key_message,
)
from samstudy.study.grid import flatten_config, flatten_overrides, iter_block, run_name, trial_id
from samstudy.train.config import EPOCH_METRICS, TrialConfig

__all__ = [
    "METRICS",
    "AshaSpec",
    "ParamSpec",
    "Resources",
    "SearchSpec",
    "StudyError",
    "StudySpec",
    "Tracking",
    "TrialSpec",
    "flatten_config",
    "format_plan",
    "load_study",
    "run_name",
    "study_from_mapping",
]

# Metric names a search may optimise (the trainer's per-epoch metrics).
METRICS = EPOCH_METRICS

# Errors listed per study before the message is cut short (a bad grid key repeats per trial).
_MAX_ERRORS = 6


class StudyError(Exception):
    """A study file that cannot run; the message names file, field path and allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class Tracking(_Strict):
    """MLflow options; both default to the conventions of docs/architecture.md."""

    experiment: str | None = Field(None, description="MLflow experiment; default: the study name")
    tracking_uri: str | None = Field(
        None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db"
    )


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


@dataclass(frozen=True)
class TrialSpec:
    """One expanded trial: the unit Ray Tune runs and MLflow records."""

    trial_id: str
    name: str
    config: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (what travels through Ray Tune's param space)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialSpec:
        """Inverse of :meth:`to_dict`."""
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
    # Each checkpoint handed to Tune costs a round trip to its driver and, every few, a snapshot
    # of its experiment state: for epochs of milliseconds that outweighs what a retry would redo.
    checkpoint_min_s: float = Field(
        10.0, ge=0, description="seconds of a trial's run between checkpoints kept; 0 = every one"
    )

    _base_raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _path: Path = PrivateAttr(default=Path("<memory>"))
    _sha256: str = PrivateAttr(default="")
    _trials: list[TrialSpec] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_base(cls, data: Any, handler: Any) -> StudySpec:
        # Grid values merge into what the user wrote, not the defaults-filled base: a block
        # `optimizer: {base: adamw}` must not inherit SGD's momentum default.
        spec = handler(data)
        raw = data.get("base") if isinstance(data, dict) else None
        spec._base_raw = copy.deepcopy(raw) if isinstance(raw, dict) else {}
        return spec

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
    def base_raw(self) -> dict[str, Any]:
        """The ``base:`` mapping as written (grid values merge into this)."""
        return copy.deepcopy(self._base_raw)

    @property
    def experiment(self) -> str:
        """MLflow experiment name: ``tracking.experiment`` or the study name."""
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
        raw = copy.deepcopy(self._base_raw)
        defaults = self.base.model_dump(mode="json")
        flat: dict[str, Any] = {}
        for path, value in overrides.items():
            parts = check_path(TrialConfig, path)
            value = _plain(value)
            set_path(raw, parts, value, defaults)
            flat.update(flatten_overrides(path, value))
        config = TrialConfig.model_validate(raw)
        _check_model_kwargs(config)
        dumped = config.model_dump(mode="json")
        return TrialSpec(
            trial_id=trial_id(dumped), name=run_name(dumped, flat), config=dumped, overrides=flat
        )

    def expand(self) -> list[TrialSpec]:
        """Every trial of a grid study, validated; seeds vary slowest (see docs/studies.md).

        For a search study this is the single base trial (what ``plan`` prices per sample).
        """
        if self._trials is None:
            self._trials = _expand(self)
        return list(self._trials)


def _plain(value: Any) -> Any:
    """numpy / torch scalars from a search sampler -> Python numbers."""
    if hasattr(value, "item") and not isinstance(value, str | bytes | list | dict):
        return value.item()
    return value


def _check_model_kwargs(config: TrialConfig) -> None:
    # TrialConfig leaves model.kwargs free-form; the registry knows each builder's arguments.
    if not config.model.kwargs:
        return
    from samstudy.models import model_kwargs

    allowed = model_kwargs(config.model.name)
    for key in config.model.kwargs:
        if key not in allowed:
            where = f"model {config.model.name!r}"
            raise PathError("model.kwargs: " + unknown_key_message(key, allowed, "argument", where))


# -- grid checks -----------------------------------------------------------------------------


def _check_grid(spec: StudySpec) -> list[str]:
    """Shape and path problems of the grid, as 'field: message' strings."""
    problems: list[str] = []
    if spec.grid is not None and isinstance(spec.grid, list) and not spec.grid:
        problems.append("grid: an empty list; give at least one block or leave grid out")
    many = isinstance(spec.grid, list)
    for b, block in enumerate(spec.blocks):
        where = f"grid[{b}]" if many else "grid"
        if not isinstance(block, dict):
            problems.append(f"{where}: must be a mapping of dotted path -> list of values")
            continue
        if spec.grid is not None and not block:
            problems.append(f"{where}: an empty block; give at least one path")
        seen: dict[str, str] = {}
        for key, values in block.items():
            if key == "zip":
                problems += _check_zip(where, values, seen, spec)
                continue
            problems += _check_axis(f"{where}.{key}", key, values, seen, spec)
    return problems


def _check_axis(
    field_path: str, key: str, values: Any, seen: dict[str, str], spec: StudySpec
) -> list[str]:
    problems: list[str] = []
    try:
        check_path(TrialConfig, key)
    except PathError as exc:
        return [f"{field_path}: {exc}"]
    if key == "seed" and spec.seed_list is not None:
        problems.append(f"{field_path}: seeds/repeats already set the seed; vary it in one place")
    canonical = ".".join(map(str, parse_path(key)))
    if canonical in seen:
        problems.append(f"{field_path}: path {key!r} is already varied at {seen[canonical]}")
    seen[canonical] = field_path
    if not isinstance(values, list):
        problems.append(
            f"{field_path}: must be a list of values, got {type(values).__name__} {values!r}; "
            f"write [{values!r}] for one value, or put it in base"
        )
    elif not values:
        problems.append(f"{field_path}: an empty list gives no trials; give at least one value")
    return problems


def _check_zip(where: str, groups: Any, seen: dict[str, str], spec: StudySpec) -> list[str]:
    field_path = f"{where}.zip"
    if not isinstance(groups, list) or not groups:
        return [f"{field_path}: must be a non-empty list of groups (path -> equal-length lists)"]
    problems: list[str] = []
    for g, group in enumerate(groups):
        gpath = f"{field_path}[{g}]"
        if not isinstance(group, dict) or len(group) < 1:
            problems.append(f"{gpath}: must be a mapping of dotted path -> list of values")
            continue
        lengths: dict[str, int] = {}
        for key, values in group.items():
            sub = _check_axis(f"{gpath}.{key}", key, values, seen, spec)
            problems += sub
            if isinstance(values, list):
                lengths[key] = len(values)
        if len(set(lengths.values())) > 1:
            sizes = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            problems.append(f"{gpath}: zipped lists must have equal lengths, got {sizes}")
    return problems


def _describe(overrides: dict[str, Any]) -> str:
    if not overrides:
        return "base"
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def _trial_problem(exc: Exception) -> str:
    """One line per problem of an invalid trial config (pydantic loc -> dotted path)."""
    if isinstance(exc, ValidationError):
        lines = []
        for err in exc.errors():
            lines.append(_located(tuple(err.get("loc", ())), _message(err, TrialConfig)))
        return "; ".join(lines)
    return str(exc)


def _expand(spec: StudySpec) -> list[TrialSpec]:
    problems = _check_grid(spec)
    if problems:
        raise _study_error(spec.path, problems)
    seeds = spec.seed_list
    many = isinstance(spec.grid, list)
    trials: list[TrialSpec] = []
    origin: dict[str, str] = {}
    errors: dict[str, str] = {}
    for seed in seeds if seeds is not None else [None]:
        for b, block in enumerate(spec.blocks):
            where = f"grid[{b}]" if many else "grid" if spec.grid is not None else "base"
            for overrides in iter_block(block):
                if seed is not None:
                    overrides = {**overrides, "seed": seed}
                try:
                    trial = spec.trial_from_overrides(overrides)
                except (ValueError, TypeError) as exc:
                    problem = _trial_problem(exc)
                    # The same bad value recurs across seeds and other axes: report it once.
                    # Without overrides the problem is in base itself: extend its path.
                    label = f"{where} ({_describe(overrides)}): " if overrides else "base."
                    errors.setdefault(problem, f"{label}{problem}")
                    continue
                label = f"{where} ({_describe(overrides)})"
                if trial.trial_id in origin:
                    errors.setdefault(
                        trial.trial_id,
                        f"{label}: duplicate trial, the same config as {origin[trial.trial_id]}; "
                        "remove one (e.g. vary rho only in the SAM-family block)",
                    )
                    continue
                origin[trial.trial_id] = label
                trials.append(trial)
    if errors:
        raise _study_error(spec.path, list(errors.values()))
    return _unique_names(trials)


def _unique_names(trials: list[TrialSpec]) -> list[TrialSpec]:
    # Names are for people (MLflow run names); the id is the key. Keep names distinct anyway.
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.name] = counts.get(t.name, 0) + 1
    return [
        TrialSpec(t.trial_id, f"{t.name}-{t.trial_id[:6]}", t.config, t.overrides)
        if counts[t.name] > 1
        else t
        for t in trials
    ]


def _check_search(spec: StudySpec) -> None:
    """Every search path exists and each range's ends (or each category) is a valid trial."""
    assert spec.search is not None
    problems: list[str] = []
    for path, param in spec.search.params.items():
        field_path = f"search.params.{path}"
        try:
            check_path(TrialConfig, path)
        except PathError as exc:
            problems.append(f"{field_path}: {exc}")
            continue
        names = (
            ["values"] * len(param.corners()) if param.type == "categorical" else ["low", "high"]
        )
        for which, value in zip(names, param.corners(), strict=True):
            try:
                spec.trial_from_overrides({path: value})
            except (ValueError, TypeError) as exc:
                problems.append(
                    f"{field_path}.{which} ({json.dumps(value)}): {_trial_problem(exc)}"
                )
    if problems:
        raise _study_error(spec.path, problems)


# -- loading ---------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `5e-4` as a string; study files are full of such numbers, so read
# them as floats the way YAML 1.2 and JSON do.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _resolve(name_or_path: str | Path, studies_dir: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    if candidate.parent != Path("."):
        return candidate.with_name(candidate.name + ".yaml")  # studies/quickstart
    return Path(studies_dir) / f"{candidate.name}.yaml"


def load_study(name_or_path: str | Path, studies_dir: str | Path = "studies") -> StudySpec:
    """Load and fully validate a study: a bare name means ``<studies_dir>/NAME.yaml``.

    Grid studies are expanded (every trial config validated) here, so a returned spec can run.
    """
    path = _resolve(name_or_path, studies_dir)
    if not path.is_file():
        available = sorted(p.stem for p in Path(studies_dir).glob("*.yaml"))
        hint = f"; studies in {studies_dir}/: {', '.join(available)}" if available else ""
        raise StudyError(f"{path}: no such study file{hint}")
    data_bytes = path.read_bytes()
    try:
        data = yaml.load(data_bytes.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except UnicodeDecodeError as exc:
        raise StudyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise StudyError(f"{path}: YAML syntax error at {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: YAML error: {exc}") from None
    if data is None:
        raise StudyError(f"{path}: the file is empty; a study needs at least 'name' and 'base'")
    spec = study_from_mapping(data, path=path, sha256=hashlib.sha256(data_bytes).hexdigest())
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
    path = Path(path)
    if not isinstance(data, dict):
        raise StudyError(
            f"{path}: the top level must be a mapping (name:, base:, grid: ...), "
            f"got {type(data).__name__}"
        )
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise _study_error(path, [_format_error(err) for err in exc.errors()]) from None
    spec._path = path
    spec._sha256 = (
        sha256 or hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    )
    if spec.search is not None:
        _check_search(spec)
    spec.expand()
    return spec


# -- error formatting ------------------------------------------------------------------------


def _study_error(path: Path, problems: list[str]) -> StudyError:
    shown = problems[:_MAX_ERRORS]
    more = len(problems) - len(shown)
    lines = [f"{path}: {p}" for p in shown]
    if more > 0:
        lines.append(f"{path}: ... and {more} more problem(s)")
    return StudyError("\n".join(lines))


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _located(loc: tuple[Any, ...], message: str) -> str:
    """``loc: message``; a message that already starts with the last key extends the path.

    (The optimizer's own errors read ``optimizer.rho: ...``: under ``base.optimizer`` that
    becomes ``base.optimizer.rho: ...`` rather than repeating ``optimizer``.)
    """
    if loc and isinstance(loc[-1], str) and message.startswith((f"{loc[-1]}.", f"{loc[-1]}:")):
        parent = _dotted(loc[:-1])
        return f"{parent}.{message}" if parent else message
    where = _dotted(loc)
    return f"{where}: {message}" if where else message


def _format_error(err: dict[str, Any]) -> str:
    return _located(tuple(err.get("loc", ())), _message(err, StudySpec))


def _message(err: dict[str, Any], root: type[BaseModel]) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        allowed = fields_at(root, loc[:-1])
        if allowed is not None:
            return unknown_key_message(str(loc[-1]), allowed)
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind == "missing":
        return "required field is missing"
    value = err.get("input")
    if not isinstance(value, dict | list) and kind not in ("value_error", "assertion_error"):
        msg += f" (got {value!r})"
    return msg


from samstudy.study.plan import format_plan  # noqa: E402  (plan.py needs StudySpec's module)
