"""Grid blocks: their Cartesian product and the flattened overrides each trial records.

Everything here works on plain mappings; the schema lives in ``spec.py``, dotted-path handling
(parse, check, set) in ``samstudy.configpath``, ids and run names in ``samstudy.identity``.
"""

from __future__ import annotations

import itertools
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
