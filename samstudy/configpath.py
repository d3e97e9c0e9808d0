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
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

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


def unknown_value_message(value: Any, allowed: Iterable[Any]) -> str:
    """``unknown 'asam' (did you mean 'sam'?); allowed: sam, adaptive, clamp``."""
    allowed = [str(a) for a in allowed]
    hint = closest(str(value), allowed) if isinstance(value, str) else None
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    return f"unknown {value!r}{did_you_mean}; allowed: {', '.join(allowed)}"


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


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> X; ``X | None`` -> X (a union of several types stays)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """The members of a tagged union of sections, by tag (``{"same": SameConfig, ...}``).

    A tagged union (the ``optimizer:`` mapping, one section per preset) is a union of pydantic
    models that each fix one shared field to a single literal; pydantic puts that tag into an
    error's location, and :func:`locate` takes it out again. Anything else: ``{}``.
    """
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    members = typing.get_args(annotation)
    if not members or not all(_is_model(m) for m in members):
        return {}
    out: dict[str, type[BaseModel]] = {}
    for member in members:
        for info in member.model_fields.values():
            args = typing.get_args(info.annotation)
            if typing.get_origin(info.annotation) is typing.Literal and len(args) == 1:
                out[str(args[0])] = member
                break
    return out if len(out) == len(members) else {}


def section_keys(annotation: Any) -> list[str] | None:
    """The keys a section accepts (every member's, for a tagged union); None if not a section."""
    members = tagged_members(annotation)
    if members:
        keys: dict[str, None] = {}
        for member in members.values():
            keys.update(dict.fromkeys(member.model_fields))
        return list(keys)
    annotation = _unwrap(annotation)
    return list(annotation.model_fields) if _is_model(annotation) else None


def _field(annotation: Any, key: str) -> FieldInfo | None:
    """The field ``key`` of a section or of any member of a tagged union."""
    members = tagged_members(annotation)
    for model in members.values() if members else [_unwrap(annotation)]:
        if _is_model(model) and key in model.model_fields:
            return model.model_fields[key]
    return None


def _item(annotation: Any, index: int) -> Any:
    """The type of item ``index`` of a list or tuple annotation (Any when unknown)."""
    args = [a for a in typing.get_args(_unwrap(annotation)) if a is not Ellipsis]
    if not args:
        return Any
    return args[index] if len(args) > 1 and index < len(args) else args[0]


@dataclass(frozen=True)
class Location:
    """Where a pydantic error location points: the path a user wrote, and its schema."""

    parts: tuple[PathPart, ...]  # union tags removed
    field: FieldInfo | None  # the innermost named field on the way (a list item: its list's)
    name: str | None  # that field's key
    annotation: Any  # the type at the location


def locate(root: Any, loc: Iterable[Any]) -> Location:
    """Follow a pydantic error location through ``root``'s schema, dropping union tags."""
    annotation: Any = root
    parts: list[PathPart] = []
    field: FieldInfo | None = None
    name: str | None = None
    for part in loc:
        members = tagged_members(annotation)
        if isinstance(part, str) and part in members:
            annotation = members[part]  # a union tag, not something the user wrote
            continue
        parts.append(part)
        if isinstance(part, int):
            annotation = _item(annotation, part)
            continue
        info = _field(annotation, part)
        if info is not None:
            field, name, annotation = info, part, info.annotation
        elif typing.get_origin(_unwrap(annotation)) in (dict, Mapping):
            args = typing.get_args(_unwrap(annotation))
            annotation = args[1] if len(args) == 2 else Any
        else:
            annotation = Any
    return Location(tuple(parts), field, name, annotation)


def check_path(model_cls: type[BaseModel], path: str) -> list[PathPart]:
    """Check that ``path`` can address a leaf of ``model_cls``; return its parts.

    Pydantic sections are checked field by field (with a 'did you mean'), the optimizer's tagged
    union against the knobs of every preset; free-form mappings (``model.kwargs``) accept any key
    because their own validators name the argument; lists accept integer indices (the index is
    checked against the actual list when it is set).
    """
    parts = parse_path(path)
    annotation: Any = model_cls
    walked: list[str] = []
    for part in parts:
        where = ".".join(walked) or "the trial config"
        keys = section_keys(annotation)
        plain = _unwrap(annotation)
        if keys is not None:
            if isinstance(part, int):
                raise PathError(f"{where} is a section, not a list; it has no index {part}")
            info = _field(annotation, part)
            if info is None:
                raise PathError(unknown_key_message(part, keys, where=".".join(walked)))
            annotation = info.annotation
        else:
            origin = typing.get_origin(plain)
            if plain is Any:
                pass  # free-form value: keys and list indices both allowed
            elif origin in (dict, Mapping) or plain is dict:
                if isinstance(part, int):
                    raise PathError(f"{where} is a mapping; use a key, not index {part}")
                args = typing.get_args(plain)
                annotation = args[1] if len(args) == 2 else Any
            elif origin in (list, tuple) or plain in (list, tuple):
                if not isinstance(part, int):
                    raise PathError(f"{where} is a list; address an item as {where}.0")
                annotation = _item(plain, part)
            else:
                kind = getattr(plain, "__name__", str(plain))
                raise PathError(f"{where} is a value ({kind}), it has no {part!r}")
        walked.append(str(part))
    return parts


def fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Keys of the section at ``loc`` (for 'allowed:' lists), if it is one."""
    return section_keys(locate(root, loc).annotation)


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
