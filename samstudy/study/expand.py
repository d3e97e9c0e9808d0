"""Expansion of a study into trials: grid checks, the Cartesian blocks, seeds, search checks.

Every trial config is validated here (``TrialConfig``) and gets its identity
(``samstudy.identity``: trial id, run name, variant label, variant id), so nothing that starts
can fail on its config. Problems are collected per study and raised as one ``StudyError``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from samstudy.configio import problems as config_problems
from samstudy.configpath import PathError, check_path, parse_path, set_path, unknown_key_message
from samstudy.identity import identify
from samstudy.study.grid import flatten_overrides, iter_block
from samstudy.study.spec import StudySpec, TrialSpec, study_error
from samstudy.train.config import TrialConfig


def _plain(value: Any) -> Any:
    """numpy / torch scalars from a search sampler -> Python numbers."""
    if hasattr(value, "item") and not isinstance(value, str | bytes | list | dict):
        return value.item()
    return value


def trial_from_overrides(spec: StudySpec, overrides: dict[str, Any]) -> TrialSpec:
    """Validate ``spec.base`` with ``overrides`` (dotted path -> value) applied; one trial.

    Raises ``ValueError`` (a ``PathError`` for a bad path, pydantic's ``ValidationError`` for a
    bad value); :func:`expand` turns these into ``StudyError``.
    """
    raw = spec.base_raw
    defaults = spec.base.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for path, value in overrides.items():
        parts = check_path(TrialConfig, path)
        value = _plain(value)
        set_path(raw, parts, value, defaults)
        flat.update(flatten_overrides(path, value))
    config = TrialConfig.model_validate(raw)
    _check_model_kwargs(config)
    dumped = config.model_dump(mode="json")
    return TrialSpec(config=dumped, overrides=flat, **identify(dumped, flat))


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
        return "; ".join(config_problems(exc, TrialConfig))
    return str(exc)


def expand(spec: StudySpec) -> list[TrialSpec]:
    """Every trial of a grid study (the base trial of a search study), validated and named."""
    problems = _check_grid(spec)
    if problems:
        raise study_error(spec.path, problems)
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
                    trial = trial_from_overrides(spec, overrides)
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
        raise study_error(spec.path, list(errors.values()))
    return _unique_names(trials)


def _unique_names(trials: list[TrialSpec]) -> list[TrialSpec]:
    """Distinct variant labels per variant id and distinct run names per trial.

    Names are for people (the ids are the keys), but two variants under one label would be
    averaged together by eye: a label shared by several variant ids gets the id's first digits.
    """
    ids_of: dict[str, set[str]] = {}
    for t in trials:
        ids_of.setdefault(t.variant, set()).add(t.variant_id)
    names: dict[str, int] = {}
    for t in trials:
        names[t.name] = names.get(t.name, 0) + 1
    out = []
    for t in trials:
        variant = t.variant if len(ids_of[t.variant]) == 1 else f"{t.variant}-{t.variant_id[:6]}"
        name = t.name if names[t.name] == 1 else f"{t.name}-{t.trial_id[:6]}"
        out.append(TrialSpec(t.trial_id, name, t.config, t.overrides, variant, t.variant_id))
    return out


def check_search(spec: StudySpec) -> None:
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
                trial_from_overrides(spec, {path: value})
            except (ValueError, TypeError) as exc:
                problems.append(
                    f"{field_path}.{which} ({json.dumps(value)}): {_trial_problem(exc)}"
                )
    for i, point in enumerate(spec.search.points_to_evaluate):
        try:
            trial_from_overrides(spec, point)
        except (ValueError, TypeError) as exc:
            problems.append(f"search.points_to_evaluate[{i}]: {_trial_problem(exc)}")
    if problems:
        raise study_error(spec.path, problems)
