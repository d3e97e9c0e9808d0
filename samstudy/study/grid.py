"""Dotted paths into the trial config, grid expansion, trial ids and run names.

Everything here works on plain mappings; the pydantic schema lives in ``spec.py``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel

PathPart = str | int

# A path segment written ``scales[2]`` is the same as ``scales.2``.
_INDEX_RE = re.compile(r"\[(\d+)\]")


class PathError(ValueError):
    """A dotted path that does not address anything in the trial config."""


def parse_path(path: str) -> list[PathPart]:
    """Split ``optimizer.scales[0]`` / ``optimizer.scales.0`` into ``["optimizer", "scales", 0]``."""
    if not isinstance(path, str) or not path.strip():
        raise PathError(f"a path must be a non-empty string like 'optimizer.rho', got {path!r}")
    parts: list[PathPart] = []
    for raw in _INDEX_RE.sub(r".\1", path).split("."):
        if raw == "":
            raise PathError(f"path {path!r} has an empty segment")
        parts.append(int(raw) if raw.isdigit() else raw)
    return parts


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The most similar choice, for 'did you mean' hints."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(
    key: str, allowed: Iterable[str], what: str = "key", where: str = ""
) -> str:
    """``unknown key 'x' in noise (did you mean 'y'?); allowed: a, b, c``."""
    allowed = sorted(allowed)
    hint = closest(key, allowed)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    inside = f" in {where}" if where else ""
    return f"unknown {what} {key!r}{inside}{did_you_mean}; allowed: {', '.join(allowed)}"


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (the schema walk only cares about the non-None branch)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def check_path(model_cls: type[BaseModel], path: str) -> list[PathPart]:
    """Check that ``path`` can address a leaf of ``model_cls``; return its parts.

    Pydantic sections are checked field by field (with a 'did you mean'); free-form mappings
    (``optimizer``, ``model.kwargs``) accept any key because their own validators name the knob;
    lists accept integer indices (the index is checked against the actual list when it is set).
    """
    parts = parse_path(path)
    annotation: Any = model_cls
    walked: list[str] = []
    for part in parts:
        annotation = _unwrap_optional(annotation)
        where = ".".join(walked) or "the trial config"
        if _is_model(annotation):
            if isinstance(part, int):
                raise PathError(f"{where} is a section, not a list; it has no index {part}")
            fields = annotation.model_fields
            if part not in fields:
                raise PathError(unknown_key_message(part, fields, where=".".join(walked)))
            annotation = fields[part].annotation
        else:
            origin = typing.get_origin(annotation)
            if annotation is Any:
                pass  # free-form value (an optimizer knob): keys and list indices both allowed
            elif origin in (dict, Mapping) or annotation is dict:
                if isinstance(part, int):
                    raise PathError(f"{where} is a mapping; use a key, not index {part}")
                args = typing.get_args(annotation)
                annotation = args[1] if len(args) == 2 else Any
            elif origin in (list, tuple) or annotation in (list, tuple):
                if not isinstance(part, int):
                    raise PathError(f"{where} is a list; address an item as {where}.0")
                args = typing.get_args(annotation)
                annotation = args[0] if args else Any
            else:
                kind = getattr(annotation, "__name__", str(annotation))
                raise PathError(f"{where} is a value ({kind}), it has no {part!r}")
        walked.append(str(part))
    return parts


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in: mappings merge key by key, the rest replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _lookup(mapping: Any, parts: list[PathPart]) -> Any:
    for part in parts:
        if isinstance(part, int):
            if not isinstance(mapping, list) or part >= len(mapping):
                return None
        elif not isinstance(mapping, Mapping) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def set_path(
    raw: dict[str, Any], parts: list[PathPart], value: Any, defaults: Mapping[str, Any]
) -> None:
    """Set ``value`` at ``parts`` inside ``raw`` (the user's partial config), in place.

    A mapping value is deep-merged into what is there. Missing sections are created; a list that
    is indexed but missing from ``raw`` is copied from ``defaults`` (the fully validated base), so
    ``schedule.milestones.0`` works even when the base does not spell the list out.
    """
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                where = ".".join(map(str, parts[:depth]))
                raise PathError(f"{where} has no item {part} (length {_len(node)})")
            child = node[part]
        else:
            child = node.get(part)
            if child is None:
                default = _lookup(defaults, parts[: depth + 1])
                child = copy.deepcopy(default) if isinstance(nxt, int) else {}
                if child is None:
                    where = ".".join(map(str, parts[: depth + 1]))
                    raise PathError(f"{where} is not set in base, so it has no item {nxt}")
                node[part] = child
        if isinstance(nxt, int) and isinstance(child, list):
            # Copy so that trials never share (and mutate) one list object.
            child = list(child)
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            where = ".".join(map(str, parts[:-1]))
            raise PathError(f"{where} has no item {last} (length {_len(node)})")
        node[last] = copy.deepcopy(value)
    elif isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def _len(node: Any) -> str:
    return str(len(node)) if isinstance(node, list) else "not a list"


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
