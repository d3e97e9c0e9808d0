"""A study's Tune search space: the grid of expanded trials, or Tune domains for a search.

Grid studies become one ``tune.grid_search`` over the expanded trials (each a plain dict: id,
run name, full config, overrides, variant); search studies sample ``overrides`` (dotted path ->
value) that the worker turns into a trial with ``StudySpec.trial_from_overrides``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from samstudy.study.spec import StudySpec, TrialSpec


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def param_space(study: StudySpec, trials: Sequence[TrialSpec]) -> dict[str, Any]:
    """Tune's ``param_space``: the grid of ``trials``, longest first, or :func:`search_space`."""
    from ray import tune

    if study.search is None:
        return {"trial": tune.grid_search([t.to_dict() for t in longest_first(study, trials)])}
    return search_space(study)


def longest_first(study: StudySpec, trials: Sequence[TrialSpec]) -> list[TrialSpec]:
    """``trials`` by ``plan``'s time estimate, longest first (ties keep the study's order).

    Tune starts a grid's trials in its order as slots free up: with the long trials (a
    WRN-28-10 beside ResNet-18s, 200 epochs beside 50) started first, the short ones fill the
    slots at the end instead of one long trial running on alone while the others idle.
    """
    from samstudy.study.plan import study_trial_seconds

    seconds = study_trial_seconds(study, trials)
    order = sorted(range(len(trials)), key=lambda i: seconds[i], reverse=True)
    return [trials[i] for i in order]


def search_space(study: StudySpec) -> dict[str, Any]:
    """Tune domains for a search study's params (Optuna only takes plain categorical values,
    so lists, e.g. a whole ``optimizer.scales``, travel as JSON strings)."""
    from ray import tune

    assert study.search is not None
    space: dict[str, Any] = {}
    for path, param in study.search.params.items():
        if param.type == "categorical":
            values = list(param.values or [])
            if all(_is_plain(v) for v in values):
                space[path] = tune.choice(values)
            else:
                space[path] = tune.choice([json.dumps(v) for v in values])
        elif param.type == "int":
            low, high = int(param.low), int(param.high) + 1  # type: ignore[arg-type]
            space[path] = tune.lograndint(low, high) if param.log else tune.randint(low, high)
        else:
            low_f, high_f = float(param.low), float(param.high)  # type: ignore[arg-type]
            space[path] = (
                tune.loguniform(low_f, high_f) if param.log else tune.uniform(low_f, high_f)
            )
    return {"overrides": space}


def initial_points(study: StudySpec) -> list[dict[str, Any]]:
    """``search.points_to_evaluate`` as OptunaSearch takes them: keyed by the flattened names
    of :func:`search_space` (``overrides/optimizer.rho``), lists JSON-encoded as there."""
    assert study.search is not None
    points = []
    for point in study.search.points_to_evaluate:
        encoded = {}
        for path, value in point.items():
            values = study.search.params[path].values or []
            plain = all(_is_plain(v) for v in values)
            encoded[f"overrides/{path}"] = value if plain else json.dumps(value)
        points.append(encoded)
    return points


def decode_overrides(study: StudySpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`search_space`'s JSON encoding of non-plain categorical values."""
    assert study.search is not None
    out = dict(overrides)
    for path, param in study.search.params.items():
        values = param.values or []
        if param.type == "categorical" and not all(_is_plain(v) for v in values):
            if isinstance(out.get(path), str):
                out[path] = json.loads(out[path])
    return out
