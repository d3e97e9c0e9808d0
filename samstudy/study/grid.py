"""Grid expansion, flattened overrides, trial ids and run names.

Everything here works on plain mappings; the pydantic schema lives in ``spec.py`` and dotted-path
handling (parse, check, set) in ``samstudy.configpath``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Mapping
from typing import Any


def flatten_overrides(path: str, value: Any) -> dict[str, Any]:
    """``optimizer: {name: same, scales: [...]}`` -> ``{optimizer.name: same, optimizer.scales: [...]}``.

    Setting each flattened leaf gives the same config as deep-merging the mapping, so the
    flattened form is what trials record (and what a search point looks like).
    """
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten_overrides(f"{path}.{key}", sub))
        return out
    return {path: value}


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
    """Key-sorted compact JSON of a config: the input of the trial id."""
    return json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))


def trial_id(config: Mapping[str, Any]) -> str:
    """Stable short id of a full trial config (12 hex digits of its canonical JSON's sha256)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


def _num(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_num(v) for v in value) + "]"
    return str(value)


# Override paths that the fixed part of a run name already shows.
_NAMED_PATHS = (
    "optimizer.name",
    "optimizer.scales",
    "optimizer.alpha",
    "optimizer.region",
    "optimizer.rho",
    "optimizer.base",
    "optimizer.ascent",
    "optimizer.second_grad",
    "optimizer.m",
    "model.name",
    "noise.rate",
    "noise.kind",
    "seed",
)


def _is_named(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in _NAMED_PATHS)


def run_name(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> str:
    """A readable run name, e.g. ``same[2,0,0,0]-rho0.1-resnet18-n0.4-s1``.

    The optimizer label carries the variant's own knobs (scales, alpha, region, ascent, second
    gradient, m, a non-SGD base); then rho (two-step optimizers only), the model, the noise and
    the seed. Any other path a trial varies (``overrides``) is appended as ``<leaf><value>`` so
    that trials of one study get distinct names.
    """
    opt = config.get("optimizer", {})
    name = str(opt.get("name", "sam"))
    label = name
    if opt.get("scales") is not None:
        label += _num(list(opt["scales"]))
    if opt.get("region") is not None:
        label += str(opt["region"])
    if opt.get("alpha") is not None:
        label += f"(a{_num(opt['alpha'])})"
    if opt.get("ascent", "sam") != "sam":
        label += f"+{opt['ascent']}"
    if opt.get("second_grad", "full") != "full":
        label += f"+{opt['second_grad']}"
    if opt.get("m") is not None:
        label += f"+m{opt['m']}"
    if opt.get("base", "sgd") != "sgd":
        label += f"/{opt['base']}"
    parts = [label]
    if name != "sgd" and opt.get("rho") is not None:
        parts.append(f"rho{_num(opt['rho'])}")
    parts.append(str(config.get("model", {}).get("name", "?")))
    noise = config.get("noise", {})
    kind = noise.get("kind", "none")
    if kind == "symmetric":
        parts.append(f"n{_num(noise.get('rate', 0.0))}")
    elif kind == "asymmetric":
        parts.append(f"asym{_num(noise.get('rate', 0.0))}")
    elif kind == "human":
        parts.append(f"human-{noise.get('label_key', '')}")
    for path, value in (overrides or {}).items():
        if _is_named(path):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, bool):
            parts.append(leaf if value else f"no_{leaf}")
        else:
            parts.append(f"{leaf}{_num(value)}")
    parts.append(f"s{config.get('seed', 0)}")
    return "-".join(parts)


def iter_block(block: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The override mappings of one (already checked) grid block, in Cartesian order.

    Keys vary in the order written, the first key slowest; a ``zip`` group is one factor whose
    lists advance together.
    """
    factors: list[list[dict[str, Any]]] = []
    for key, values in block.items():
        if key == "zip":
            for group in values:
                paths = list(group)
                factors.append(
                    [
                        dict(zip(paths, combo, strict=True))
                        for combo in zip(*group.values(), strict=True)
                    ]
                )
        else:
            factors.append([{key: value} for value in values])
    for combo in itertools.product(*factors):
        merged: dict[str, Any] = {}
        for part in combo:
            merged.update(part)
        yield merged
