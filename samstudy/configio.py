"""The one way samstudy reads configs: a YAML loader and a formatter of validation errors.

Every command that reads a config (``train --config/--set``, ``plan``, ``study``, ``export``,
``report``) goes through :func:`read_yaml` / :func:`parse_yaml` and reports problems with
:func:`problems` as ``<file>: <field.path>: <what is wrong and what is allowed>``.

The loader is ``yaml.SafeLoader`` with two changes: plain scalars are read by YAML 1.2's core
schema, as JSON reads them (PyYAML implements YAML 1.1, where ``5e-4`` and ``1E3`` are strings,
``yes`` is a boolean, ``010`` is eight and ``2024-01-02`` a date; here they are numbers, a
string, ten and a string), and a key written twice in one mapping is refused with both lines
(plain YAML keeps the last one silently). Only pydantic and PyYAML are imported here.
"""

from __future__ import annotations

import argparse
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from samstudy.configpath import (
    PathError,
    check_path,
    fields_at,
    locate,
    section_keys,
    set_path,
    unknown_key_message,
    unknown_value_message,
)

# Problems shown per file before the list is cut short (a bad grid value repeats per trial).
MAX_PROBLEMS = 6


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the field and what is allowed."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and duplicate keys refused (see the module docstring)."""


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.again = key, first, again


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKeyError(key, seen[key], key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    if digits.startswith(("0x", "0o")):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits, 10)  # 010 is ten, as in YAML 1.2 (YAML 1.1: eight)


# YAML 1.2's core schema for the implicit scalars (PyYAML implements YAML 1.1, where `5e-4` is a
# string, `yes` a boolean, `010` eight, `1:30` ninety and `2024-01-02` a date). PyYAML copies the
# resolvers of its base class on the first add, so SafeLoader keeps its own.
_CORE = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp")}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)  # type: ignore[arg-type]
_Loader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text -> plain data (mappings, lists, str, int, float, bool, None); ConfigError if bad."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{source}: duplicate key {exc.key!r} at line {exc.again.line + 1}, column "
            f"{exc.again.column + 1} (first on line {exc.first.line + 1}); a key may appear "
            "once per mapping"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{source}: YAML syntax error at {where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML error: {exc}") from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file (UTF-8) with :func:`parse_yaml`; None for an empty file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path))


def add_set_option(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--set KEY.PATH=VALUE`` option (repeatable) of ``train``, ``plan`` and ``study``;
    the assignments land in ``args.overrides``, for :func:`apply_override`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help=f"override {what}; VALUE is read as YAML (repeatable), e.g. optimizer.rho=1e-2",
    )


def apply_override(
    mapping: dict[str, Any], assignment: str, schema: Any, defaults: dict[str, Any]
) -> None:
    """Set ``KEY.PATH=VALUE`` in ``mapping`` (a partial config of ``schema``), in place.

    The value is read as YAML by :func:`parse_yaml` (``1e-2`` is a number); the path is checked
    against ``schema`` and set with the study files' rules (``samstudy.configpath``:
    ``optimizer.scales.0=2`` indexes a list, a mapping value merges); ``defaults`` is the
    validated config a missing list is copied from.
    """
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    value = parse_yaml(raw, f"--set {assignment!r}") if raw.strip() else ""
    try:
        set_path(mapping, check_path(schema, key.strip()), value, defaults)
    except PathError as exc:
        raise ConfigError(f"--set {assignment!r}: {exc}") from None


# -- validation errors -------------------------------------------------------------------------

_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_BOUND_KEYS = {
    "greater_than": "gt",
    "greater_than_equal": "ge",
    "less_than": "lt",
    "less_than_equal": "le",
}
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _dotted(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _message(err: dict[str, Any], root: Any) -> tuple[tuple[Any, ...], str]:
    """(path the user wrote, message) of one pydantic error."""
    where = locate(root, err.get("loc", ()))
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    got = f", got {value!r}"
    if kind == "extra_forbidden" and where.parts:
        allowed = fields_at(root, tuple(err["loc"])[:-1]) or []
        return where.parts, unknown_key_message(str(where.parts[-1]), allowed)
    if kind == "missing" and where.parts and isinstance(where.parts[-1], int):
        described = (
            f" ({where.field.description})" if where.field and where.field.description else ""
        )
        return where.parts[:-1], f"too short: no item {where.parts[-1]}{described}"
    if kind == "missing":
        described = (
            f": {where.field.description}" if where.field and where.field.description else ""
        )
        return where.parts, f"required{described}"
    if kind == "literal_error":
        allowed = typing.get_args(where.annotation) or [ctx.get("expected", "")]
        return where.parts, unknown_value_message(value, allowed)
    if kind in _BOUNDS:
        message = f"expected a number {_BOUNDS[kind]} {_fmt(ctx[_BOUND_KEYS[kind]])}{got}"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}{got}"
    elif kind in ("too_short", "too_long"):
        length = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        message = f"expected {length} items{got}"
    elif kind in ("value_error", "assertion_error"):
        return where.parts, str(err.get("msg", "")).removeprefix("Value error, ")
    else:
        message = str(err.get("msg", "invalid"))
        if not isinstance(value, dict | list):
            message += f" (got {value!r})"
    if where.field is not None and where.field.description:
        message += f" ({where.name}: {where.field.description})"
    return where.parts, message


def _joined(root: Any, parts: tuple[Any, ...], message: str, prefix: str = "") -> str:
    """``path: message``; a message naming a key of the section at ``parts`` extends the path.

    Validators of a section speak of its keys (``rho: expected ...`` from the optimizer,
    ``noise.kind 'human' needs ...`` from the noise section); the path then ends at that key.
    """
    head = re.match(r"([A-Za-z_][A-Za-z0-9_]*)[:.]", message)
    extends = bool(head and parts and head.group(1) == parts[-1])
    if extends:
        parts = parts[:-1]
    else:
        extends = bool(
            head and head.group(1) in (section_keys(locate(root, parts).annotation) or ())
        )
    where = ".".join(p for p in (prefix, _dotted(parts)) if p)
    if not where:
        return message
    return f"{where}.{message}" if extends else f"{where}: {message}"


def problems(error: ValidationError, root: Any, prefix: str = "") -> list[str]:
    """One ``field.path: message`` line per problem of a pydantic error against ``root``.

    ``prefix`` is put before every path (``base`` for a study's base config).
    """
    out = []
    for err in error.errors():
        parts, message = _message(err, root)
        out.append(_joined(root, parts, message, prefix))
    return list(dict.fromkeys(out))


def report(source: str | Path, lines: Iterable[str], limit: int = MAX_PROBLEMS) -> str:
    """``source: line`` for each problem, cut short after ``limit`` lines."""
    lines = list(lines)
    shown = [f"{source}: {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"{source}: ... and {len(lines) - limit} more problem(s)")
    return "\n".join(shown)
