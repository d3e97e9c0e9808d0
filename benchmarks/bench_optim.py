"""Per-step cost of every optimizer variant against plain SAM, measured in one run.

torchvision's ResNet-18 (num_classes=10, 11.2M parameters) on CIFAR-shaped random data. Each
variant is timed in a block of alternating steps with its reference (plain SAM, statistics off,
unless the row says otherwise), so both sides see the same machine load; the ratio is the median
over pairs of variant step / neighbouring reference step. ``lr = 0`` keeps the weights, and so
the work of every step, identical. Full run: about 10 minutes on 2 cores (compiling included).
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
    ("sam, statistics on every step vs off", {"name": "sam", "stats_every": 1}, None),
    (
        "sam, statistics on (default: every 4th step) vs off",
        {"name": "sam", "stats": True, "stats_every": 4},
        None,
    ),
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
    (
        "m-sharpness, 4 micro-batches (m = batch / 4)",
        {"name": "sam", "m": 32, "stats": False},
        None,
    ),
    (
        "custom_same, statistics on every step vs off",
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats_every": 1},
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], "stats": False},
    ),
]

# The rule as eager torch ops (compile: false), which is what non-CPU devices and models under
# AUTO_COMPILE_MIN_NUMEL parameters run; the rows above use the default (compile: auto).
EAGER = {"stats": False, "compile": False}
EAGER_ROWS: list[Row] = [
    ("same [1, 0, 0, 0], eager rule", {"name": "same", "scales": [1.0, 0, 0, 0], **EAGER}, None),
    (
        "custom_same [0.5, 0, -0.5, 0.5], eager rule",
        {"name": "custom_same", "scales": [0.5, 0, -0.5, 0.5], **EAGER},
        None,
    ),
    ("sgd_where_agree, eager rule", {"name": "sgd_where_agree", **EAGER}, None),
    (
        "table (all 8 coefficients), eager rule",
        {"name": "table", "coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]], **EAGER},
        None,
    ),
    (
        "sam, statistics on every step vs off, eager",
        {"name": "sam", "stats_every": 1, "compile": False},
        None,
    ),
    (
        "sam, statistics on (default: every 4th step) vs off, eager",
        {"name": "sam", "stats": True, "stats_every": 4, "compile": False},
        None,
    ),
]


def _stepper(model, knobs: dict[str, Any], x, y) -> Callable[[], None]:
    from samstudy.optim import create_optimizer

    opt = create_optimizer(model.named_parameters(), lr=0.0, rho=0.05, momentum=0.9, **knobs)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> None:
        opt.train_step(model, loss_fn, x, y)
        if x.is_cuda:  # time the kernels, not their launch
            torch.cuda.synchronize()

    return step


def _pair(model, x, y, variant: dict, ref: dict, pairs: int, warmup: int) -> dict[str, float]:
    """Alternate variant and reference steps: median step times and load-robust ratios.

    Ratios are medians over pairs of (variant step / the reference step next to it), so that
    drifts of machine load cancel, for wall time and for process CPU time. With sampled
    statistics (``stats_every`` k > 1) the unit is a cycle of k pairs instead of one pair.
    """
    run_v, run_r = _stepper(model, variant, x, y), _stepper(model, ref, x, y)
    every = variant.get("stats_every", 1)
    # whole sampling cycles, and at least 6 of them: a median over 2 cycles is mostly noise
    pairs = max(-(-pairs // every), 6 if every > 1 else 1) * every
    for _ in range(warmup):
        run_v()
        run_r()
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    for _ in range(pairs):
        for k, run in enumerate((run_v, run_r)):
            w, c = time.perf_counter(), time.process_time()
            run()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)

    def ratio(v: list[float], r: list[float]) -> float:
        sv = [sum(v[i : i + every]) for i in range(0, len(v), every)]
        sr = [sum(r[i : i + every]) for i in range(0, len(r), every)]
        return statistics.median(a / b for a, b in zip(sv, sr, strict=True))

    return {
        "variant": statistics.median(wall[0]),
        "reference": statistics.median(wall[1]),
        "wall": ratio(*wall),
        "cpu": ratio(*cpu),
    }


HEADLINE = (
    "sgd (one pass) vs sam",
    "sam, statistics on every step vs off",
    "sam, statistics on (default: every 4th step) vs off",
    "same [1, 0, 0, 0]",
    "custom_same [0.5, 0, -0.5, 0.5]",
    "table (all 8 coefficients)",
    "table (all 8 coefficients), eager rule",
    "sam, statistics on (default: every 4th step) vs off, eager",
)


def _section(title: str, rows: list[Row], model, x, y, pairs: int, warmup: int, batch: int):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"### {title} ({torch.get_num_threads()} thread(s), load average {load:.1f} at start)",
        "",
        "| variant | step (ms) | reference (ms) | ratio (wall) | ratio (CPU time) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, knobs, ref in rows:
        if "m" in knobs:  # 4 micro-batches whatever the batch size
            knobs = {**knobs, "m": batch // 4}
        if knobs.get("compile") is not False:  # compile (maybe) outside the timing
            warm = _stepper(model, knobs, x, y)
            for _ in range(knobs.get("stats_every", 1) + 1):  # measured and unmeasured steps
                warm()
        r = _pair(model, x, y, knobs, ref or REF, pairs, warmup)
        lines.append(
            f"| {label} | {r['variant'] * 1e3:.0f} | {r['reference'] * 1e3:.0f} "
            f"| {r['wall']:.3f} | {r['cpu']:.3f} |"
        )
        print(lines[-1], flush=True)
    return lines + [""]


def run(quick: bool = False) -> str:
    """Markdown tables of step-time ratios (``quick``: batch 32, fewer repeats, no eager rows).

    Two sections: the headline rows at torch's default thread count (wall time is what the
    targets are about), then every row on one thread, where process CPU time does not count
    the waits that other jobs on a shared machine impose (and no thread waits for another).
    Rows use the optimizer defaults (``compile: auto``: the rule is one compiled kernel for this
    CPU model) unless they say "eager rule".
    """
    import torchvision

    torch.manual_seed(0)
    batch = 32 if quick else 128
    pairs, warmup = (3, 1) if quick else (8, 1)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    every_row = ROWS + ([] if quick else EAGER_ROWS)
    lines = [
        f"## bench_optim: step time against plain SAM (ResNet-18, 11.2M parameters, batch "
        f"{batch}, CPU)",
        "",
        "Each row alternates its variant with its reference (plain SAM with statistics off "
        f"unless stated) for {pairs} pairs ({2 * pairs} for the headline rows) after {warmup} "
        "warm-up pair; step times are medians, "
        "ratios the median over pairs of variant / neighbouring reference step (over at least "
        "6 cycles of 4 pairs for sampled statistics). lr = 0 keeps the work of every step "
        "identical. Rows run the optimizer defaults: `compile: auto` makes the combination "
        "rule and the measurement one compiled kernel on this CPU model (compiled before the "
        "timing); rows marked 'eager rule' set `compile: false`, as GPUs and small models run.",
        "",
    ]
    threads = torch.get_num_threads()
    headline = [r for r in every_row if r[0] in HEADLINE]
    # the targets are about these: twice the pairs, so that a ratio is not one noisy median
    lines += _section("Headline rows", headline, model, x, y, 2 * pairs, warmup, batch)
    torch.set_num_threads(1)
    try:
        lines += _section("Every row, one thread", every_row, model, x, y, pairs, warmup, batch)
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():  # the GPU target (<= 1.05x SAM): flat buffers, eager rule
        gpu_rows = [r for r in every_row if "eager" not in r[0]]
        model, x, y = model.cuda(), x.cuda(), y.cuda()
        name = torch.cuda.get_device_name()
        lines += _section(f"Every row, GPU ({name})", gpu_rows, model, x, y, pairs, 2, batch)
    return "\n".join(lines)
