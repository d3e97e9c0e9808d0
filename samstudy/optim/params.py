"""Parameters as ``create_optimizer`` takes them: tensors, param groups or ``(name, tensor)``
pairs, turned into plain param groups plus the names that label the per-tensor statistics."""

from __future__ import annotations

from typing import Any

import torch


def normalize_params(params: Any) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Param groups with plain tensors, and the names given as ``(name, tensor)`` pairs."""
    if isinstance(params, torch.Tensor):
        params = [params]
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    names: dict[int, str] = {}
    for group in groups:
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        plain = []
        for item in ps:
            if isinstance(item, tuple):
                name, item = item
                names[id(item)] = str(name)
            plain.append(item)
        group["params"] = plain
        group.pop("param_names", None)  # names live in the optimizer, not in the groups
    return groups, names
