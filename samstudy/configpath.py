"""Dotted paths into the trial config: parse, check against the schema, set, list allowed keys.

One implementation shared by study files (``samstudy.study``) and ``samstudy train --set``; it
imports pydantic only (never torch, Ray or MLflow), and takes the schema class as an argument.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
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


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; a union with exactly one pydantic section -> that section."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [a for a in args if _is_model(a)]
    if len(models) == 1:
        return models[0]
    return args[0] if len(args) == 1 else annotation


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


def fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the pydantic section at ``loc`` (for 'allowed:' lists), if it is one."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if _is_model(annotation):
            if part not in annotation.model_fields:
                return None
            annotation = annotation.model_fields[part].annotation
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap_optional(annotation)
    return list(annotation.model_fields) if _is_model(annotation) else None


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
    ``schedule.milestones.0`` works even when the base does not spell the list out. A section
    that holds a plain value (``noise: 0.4``) cannot be descended into: a :class:`PathError`.
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
            _require_mapping(node, parts[:depth])
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
        return
    _require_mapping(node, parts[:-1])
    if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def _require_mapping(node: Any, parts: list[PathPart]) -> None:
    if not isinstance(node, dict):
        where = ".".join(map(str, parts))
        raise PathError(f"{where} is {node!r}, not a mapping, so it has no keys to set")


def _len(node: Any) -> str:
    return str(len(node)) if isinstance(node, list) else "not a list"
