"""Per-step cost of every optimizer variant against plain SAM, measured in one run.

torchvision's ResNet-18 (num_classes=10, 11.2M parameters) on CIFAR-shaped random data. Each
variant is timed in a block of alternating steps with the reference (plain SAM, statistics off,
unless the row says otherwise), so both sides see the same machine load; the ratio is the median
step of the variant over the median step of its reference. ``lr = 0`` keeps the weights, and
so the work of every step, identical.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

Row = tuple[str, dict[str, Any], dict[str, Any] | None]

REF: dict[str, Any] = {"name": "sam", "stats": False}

# (label, variant knobs, reference knobs; None = REF)
ROWS: list[Row] = [
    ("sgd (one pass) vs sam", {"name": "sgd", "stats": False}, None),
    ("sam, stats on vs off", {"name": "sam", "stats": True}, None),
    ("sam, stats on every 4th step", {"name": "sam", "stats": True, "stats_every": 4}, None),
    ("same [1, 0, 0, 0]", {"name": "same", "scales": [1.0, 0, 0, 0], "stats": False}, None),
    ("same [0, 0, 0, 1]", {"name": "same", "scales": [0, 0, 0, 1.0], "stats": False}, None),
    (
        "custom_same [0.5, 0, -0.5, 0.5]",
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats": False},
        None,
    ),
    ("sam_magnitude_sgd_sign", {"name": "sam_magnitude_sgd_sign", "stats": False}, None),
    ("sgd_magnitude_sam_sign", {"name": "sgd_magnitude_sam_sign", "stats": False}, None),
    ("sam_where_agree", {"name": "sam_where_agree", "stats": False}, None),
    ("sgd_where_agree", {"name": "sgd_where_agree", "stats": False}, None),
    ("saner alpha 0.5", {"name": "saner", "alpha": 0.5, "stats": False}, None),
    ("sgd_on_region 2", {"name": "sgd_on_region", "region": 2, "stats": False}, None),
    (
        "table (all 8 coefficients)",
        {"name": "table", "coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]], "stats": False},
        None,
    ),
    ("ascent adaptive", {"name": "sam", "ascent": "adaptive", "stats": False}, None),
    ("ascent clamp (3 x RMS)", {"name": "sam", "ascent": "clamp", "stats": False}, None),
    (
        "ascent clamp (quantile 0.99)",
        {"name": "sam", "ascent": "clamp", "clamp_quantile": 0.99, "stats": False},
        None,
    ),
    ("second_grad jacobian", {"name": "sam", "second_grad": "jacobian", "stats": False}, None),
    ("second_grad logit", {"name": "sam", "second_grad": "logit", "stats": False}, None),
    ("m-sharpness m = 32 (4 micro-batches)", {"name": "sam", "m": 32, "stats": False}, None),
    (
        "custom_same, stats on vs off",
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats": True},
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats": False},
    ),
]

COMPILED_ROWS: list[Row] = [
    (
        "custom_same, compiled rule",
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats": False, "compile": True},
        None,
    ),
    (
        "table, compiled rule",
        {
            "name": "table",
            "coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]],
            "stats": False,
            "compile": True,
        },
        None,
    ),
    (
        "sam, stats on, compiled",
        {"name": "sam", "stats": True, "compile": True},
        None,
    ),
]


def _stepper(model, knobs: dict[str, Any], x, y) -> Callable[[], None]:
    from samstudy.optim import create_optimizer

    opt = create_optimizer(model.named_parameters(), lr=0.0, rho=0.05, momentum=0.9, **knobs)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> None:
        opt.train_step(model, loss_fn, x, y)

    return step


def _pair(model, x, y, variant: dict, ref: dict, pairs: int, warmup: int) -> list[float]:
    """Median wall and CPU seconds per step: [wall variant, wall ref, cpu variant, cpu ref]."""
    run_v, run_r = _stepper(model, variant, x, y), _stepper(model, ref, x, y)
    for _ in range(warmup):
        run_v()
        run_r()
    times: list[list[float]] = [[], [], [], []]
    for _ in range(pairs):
        for k, run in enumerate((run_v, run_r)):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[k].append(time.perf_counter() - wall)
            times[k + 2].append(time.process_time() - cpu)
    return [statistics.median(t) for t in times]


def run(quick: bool = False) -> str:
    """Markdown table of step-time ratios (``quick``: batch 32, fewer repeats, no compile)."""
    import torchvision

    torch.manual_seed(0)
    batch = 32 if quick else 128
    pairs, warmup = (3, 1) if quick else (7, 1)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    rows = ROWS + ([] if quick else COMPILED_ROWS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"## bench_optim: step time against plain SAM (ResNet-18, 11.2M parameters, batch "
        f"{batch}, CPU, {torch.get_num_threads()} threads)",
        "",
        "Each row alternates its variant with its reference (plain SAM, statistics off, unless "
        f"stated) for {pairs} pairs after {warmup} warm-up pair(s); medians. Wall time is what "
        "the targets are about; process CPU time is steadier when other jobs share the machine "
        f"(load average {load:.1f} at the start).",
        "",
        "| variant | step (ms) | reference (ms) | ratio (wall) | ratio (CPU time) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, knobs, ref in rows:
        if knobs.get("compile"):  # compile once outside the timing
            _stepper(model, knobs, x, y)()
        wv, wr, cv, cr = _pair(model, x, y, knobs, ref or REF, pairs, warmup)
        lines.append(
            f"| {label} | {wv * 1e3:.0f} | {wr * 1e3:.0f} | {wv / wr:.3f} | {cv / cr:.3f} |"
        )
        print(lines[-1], flush=True)
    if hasattr(os, "getloadavg"):
        lines.append(f"\nLoad average at the end: {os.getloadavg()[0]:.1f}.")
    lines.append("")
    return "\n".join(lines)
