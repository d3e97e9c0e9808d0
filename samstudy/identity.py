"""What identifies a trial and a variant, decided once: config hashes, run names, variant labels.

* ``trial_id``: 12 hex digits of the sha256 of a trial config's canonical JSON (the dumped
  ``TrialConfig`` without the placement fields, :data:`PLACEMENT_PATHS`: moving a study to
  other data folders, threads or devices resumes the same trials). A study's trials are keyed
  by it from Ray Tune to MLflow to Parquet. Versions up to commit f069e68 hashed the whole
  config (:func:`config_trial_id`); the runner still resumes studies they started.
* ``variant_id``: the same hash of the config without its seed and without the fields that say
  where or how fast a trial runs (:data:`PLACEMENT_PATHS`): the runs of one variant differ only
  in their seed. ``variant``: its readable label, the run name without the seed
  (``same[2,0,0,0]-rho0.1-resnet18-n0.4``).

Both are decided at expansion (``samstudy.study``), recorded as MLflow tags and exported as
Parquet columns; the analysis groups by them. :func:`identify` recomputes them from a config and
its overrides, which is how runs logged before the tags existed get them at export.
Imports pydantic only (through the optimizer registry): no torch, Ray or MLflow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from samstudy.optim.config import LABELLED_KNOBS, optimizer_label
from samstudy.optim.presets import PRESETS, fmt
from samstudy.paths import project_root

SEED_PATH = "seed"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# Fields that say where or how fast a trial runs, not what it computes.
PLACEMENT_PATHS: tuple[str, ...] = (
    "device",
    "threads",
    "data.root",
    "data.download",
    "data.num_workers",
    "checkpoint_every",
)
# Override paths that the fixed part of a run name already shows.
NAMED_PATHS: tuple[str, ...] = (
    *(f"optimizer.{knob}" for knob in LABELLED_KNOBS),
    *sorted({f"optimizer.{k}" for p in PRESETS.values() for k in p.labelled_knobs}),
    "model.name",
    "noise.rate",
    "noise.kind",
    SEED_PATH,
)


def _jsonable(value: Any) -> Any:
    """Plain JSON types; integral floats become ints so ``rho: 1`` and ``rho: 1.0`` hash alike."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def canonical_json(config: Mapping[str, Any]) -> str:
    """Key-sorted compact JSON of a config: the input of every id."""
    return json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


def without_placement(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` without the placement fields (:data:`PLACEMENT_PATHS`)."""
    out = copy.deepcopy(dict(config))
    for path in PLACEMENT_PATHS:
        _without(out, path)
    return out


def trial_id(config: Mapping[str, Any]) -> str:
    """Stable short id of a trial config: the hash of its fields but the placement ones."""
    return config_hash(without_placement(config))


def config_trial_id(config: Mapping[str, Any]) -> str:
    """The trial id of versions up to commit f069e68: the hash of the whole config."""
    return config_hash(config)


def _without(config: Mapping[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    node: Any = config
    for key in parents:
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def variant_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` without the seed and the placement fields.

    A label file inside the project is named relative to it: the runner hands trials absolute
    paths (Ray workers run elsewhere), and a variant must not depend on which copy was hashed.
    """
    out = copy.deepcopy(dict(config))
    for path in (SEED_PATH, *PLACEMENT_PATHS):
        _without(out, path)
    noise = out.get("noise")
    label_file = noise.get("label_file") if isinstance(noise, dict) else None
    if isinstance(label_file, str) and os.path.isabs(label_file):
        root = str(project_root())
        if os.path.commonpath([root, label_file]) == root:
            noise["label_file"] = os.path.relpath(label_file, root)
    return out


def variant_id(config: Mapping[str, Any]) -> str:
    """The hash of :func:`variant_config`: equal for the seeds of one variant."""
    return config_hash(variant_config(config))


def _is_under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def label_parts(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> list[str]:
    """The pieces of a run name before the seed.

    The optimizer label (the preset's knobs, ascent, second gradient, m, a non-SGD base), rho
    (two-step presets only), the model, the noise; then every other path the trial varies
    (``overrides``) as ``<leaf><value>`` (strings as they are, booleans as ``leaf`` /
    ``no_leaf``), so that the trials of one study get distinct names.
    """
    opt = config.get("optimizer", {})
    name = str(opt.get("name", "sam"))
    parts = [optimizer_label(opt)]
    two_step = PRESETS[name].two_step if name in PRESETS else True
    if two_step and opt.get("rho") is not None:
        parts.append(f"rho{fmt(opt['rho'])}")
    parts.append(str(config.get("model", {}).get("name", "?")))
    noise = config.get("noise", {})
    kind = noise.get("kind", "none")
    if kind == "symmetric":
        parts.append(f"n{fmt(noise.get('rate', 0.0))}")
    elif kind == "asymmetric":
        parts.append(f"asym{fmt(noise.get('rate', 0.0))}")
    elif kind == "human":
        parts.append(f"human-{noise.get('label_key', '')}")
    for path, value in (overrides or {}).items():
        if _is_under(path, NAMED_PATHS):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, bool):
            parts.append(leaf if value else f"no_{leaf}")
        else:
            parts.append(f"{leaf}{fmt(value)}")
    return parts


def run_name(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> str:
    """A readable run name, e.g. ``same[2,0,0,0]-rho0.1-resnet18-n0.4-s1``."""
    return "-".join([*label_parts(config, overrides), f"s{config.get(SEED_PATH, 0)}"])


def variant_label(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> str:
    """The run name without the seed (and without varied placement fields)."""
    kept = {
        k: v
        for k, v in (overrides or {}).items()
        if not _is_under(k, (SEED_PATH, *PLACEMENT_PATHS))
    }
    return "-".join(label_parts(config, kept))


def identify(
    config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``{trial_id, name, variant, variant_id}`` of a dumped trial config."""
    return {
        "trial_id": trial_id(config),
        "name": run_name(config, overrides),
        "variant": variant_label(config, overrides),
        "variant_id": variant_id(config),
    }


# -- flat configs (MLflow params) -------------------------------------------------------------


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for every leaf; lists (and empty mappings) as JSON strings (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, dotted + "."))
        elif isinstance(value, list | tuple | Mapping):
            out[dotted] = json.dumps(value, default=str)
        else:
            out[dotted] = value
    return out


def mlflow_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The flattened trial config as MLflow params: dotted keys, values as JSON text (strings as
    they are), cut at MLflow's limit of 6000 characters."""
    params = {}
    for key, value in flatten_config(config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text[:MAX_PARAM_CHARS]
    return params


def param_value(text: str) -> Any:
    """An MLflow param string back to its value: JSON where it parses, else the string itself."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def unflatten_params(params: Mapping[str, str]) -> dict[str, Any]:
    """MLflow params (dotted keys, string values) -> the nested config they were flattened from."""
    out: dict[str, Any] = {}
    for key, text in params.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[leaf] = param_value(text)
    return out
