"""What a trial's MLflow params say: their types in Parquet, by one rule, and the variant they make.

MLflow keeps every param as a string; the tracker writes JSON text for numbers, booleans, null
and lists and the raw text for strings (``samstudy.identity.mlflow_params``). A column is typed
from all its values (``samstudy.identity.param_value`` of each), decided once per study export:

======================================  ====================================================
values of the column (nulls aside)      Parquet type
======================================  ====================================================
all integers                            int64
integers and floats                     float64
all booleans                            bool
all lists of numbers                    list<double>
all strings, or no value at all         string
anything else (mixed, lists of strings) string holding each value's MLflow text (JSON)
======================================  ====================================================

``null`` stays null. The same rule types the string params of an export written by an earlier
version (:func:`retype_string_params`; :func:`parse_param` for a pandas column) and settles a column that two studies typed differently
(:func:`unify_params`); on a column it has already typed it changes nothing.

:func:`variant_from_params` gives a run logged before the variant tags existed the ``variant``
and ``variant_id`` its expansion would have given it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from samstudy import identity

# Named as Parquet names a list's items, so a column reads back with the type it was written with.
LIST_TYPE = pa.list_(pa.field("element", pa.float64()))
_INT64 = (-(2**63), 2**63 - 1)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else "other"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list | tuple) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value
    ):
        return "numbers"
    return "other"


def param_type(values: Sequence[Any]) -> pa.DataType:
    """The Parquet type of a column of param values (Python values, None for null)."""
    kinds = {_kind(v) for v in values if v is not None}
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds and kinds <= {"int", "float"}:
        return pa.float64()
    if kinds == {"numbers"}:
        return LIST_TYPE
    # All strings, no value at all (string reads alongside any other type, null does not), or
    # mixed: the MLflow text.
    return pa.string()


def param_text(value: Any) -> str:
    """A value as MLflow keeps it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def param_array(values: Sequence[Any]) -> pa.Array:
    """The typed Arrow column of a list of param values (see the module's table)."""
    kind = param_type(values)
    if kind == pa.string():
        return pa.array([None if v is None else param_text(v) for v in values], pa.string())
    if kind == LIST_TYPE:
        return pa.array([None if v is None else [float(x) for x in v] for v in values], kind)
    return pa.array(list(values), kind)


def param_column(texts: Sequence[str | None]) -> pa.Array:
    """MLflow param strings (None: the run has no such param) -> the typed column."""
    return param_array([None if t is None else identity.param_value(t) for t in texts])


def parse_param(values: pd.Series) -> pd.Series:
    """Type a column of MLflow param strings (an export of an earlier version) by the rule.

    Integers come back as pandas ``Int64``, booleans as ``boolean`` (both keep nulls), lists
    of numbers as tuples of floats (hashable: they group and compare).
    """
    texts = [v if isinstance(v, str) else None if pd.isna(v) else str(v) for v in values]
    return arrow_to_pandas(param_column(texts), values.index)


def arrow_to_pandas(array: pa.Array | pa.ChunkedArray, index: pd.Index | None = None) -> pd.Series:
    """A typed param column as pandas: ``Int64`` / ``boolean`` with nulls, lists as tuples."""
    if pa.types.is_integer(array.type):
        return pd.Series(array.to_pandas(types_mapper=_nullable), index=index, dtype="Int64")
    if pa.types.is_boolean(array.type):
        return pd.Series(array.to_pandas(types_mapper=_nullable), index=index, dtype="boolean")
    if pa.types.is_list(array.type):
        cells = [None if v is None else tuple(v) for v in array.to_pylist()]
        return pd.Series(cells, index=index, dtype=object)
    return pd.Series(array.to_pandas(), index=index)


def _nullable(kind: pa.DataType) -> Any:
    if pa.types.is_integer(kind):
        return pd.Int64Dtype()
    if pa.types.is_boolean(kind):
        return pd.BooleanDtype()
    return None


def retype_string_params(table: pa.Table, prefix: str) -> pa.Table:
    """Type the string param columns of a runs table (the earlier version's export) by the rule.

    A no-op on the string columns this version writes: their values type as strings again.
    """
    for i, field in enumerate(table.schema):
        if field.name.startswith(prefix) and pa.types.is_string(field.type):
            typed = param_column(table.column(i).to_pylist())
            table = table.set_column(i, pa.field(field.name, typed.type), typed)
    return table


def unify_params(tables: Sequence[pa.Table], prefix: str) -> list[pa.Table]:
    """Give a param column one type across studies that typed it differently.

    The rule decides again over every study's values (an int64 and a float64 study: float64;
    a number and a string study: the MLflow text). Columns a study lacks stay missing there.
    """
    types: dict[str, set[pa.DataType]] = {}
    for table in tables:
        for field in table.schema:
            if field.name.startswith(prefix):
                types.setdefault(field.name, set()).add(field.type)
    out = list(tables)
    for name, kinds in types.items():
        if len(kinds) < 2:
            continue
        values = [v for t in out if name in t.column_names for v in t.column(name).to_pylist()]
        merged = param_array(values)
        offset = 0
        for i, table in enumerate(out):
            if name in table.column_names:
                part = merged.slice(offset, table.num_rows)
                offset += table.num_rows
                index = table.column_names.index(name)
                out[i] = table.set_column(index, pa.field(name, merged.type), part)
    return out


def variant_from_params(params: Mapping[str, str], overrides: str | None) -> tuple[str, str]:
    """``(variant, variant_id)`` of a trial from its MLflow params and its ``samstudy.overrides``
    tag (JSON), as the expansion decides them (``samstudy.identity.identify``).

    Params that are no samstudy trial config (no ``optimizer`` mapping: a run logged by another
    tool) get the hash of their config without the seed as both: it still groups the seeds, and
    the loader names such variants by the params that tell them apart.
    """
    config = identity.unflatten_params(params)
    try:
        varied = json.loads(overrides or "{}")
    except ValueError:  # the tracker cuts the tag at 5000 characters
        varied = {}
    if isinstance(config.get("optimizer"), dict):
        try:
            ident = identity.identify(config, varied if isinstance(varied, dict) else {})
            return ident["variant"], ident["variant_id"]
        except (AttributeError, TypeError, ValueError):  # e.g. a `model` param that is a string
            pass
    digest = identity.variant_id(config)
    return digest, digest
