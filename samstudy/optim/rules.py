"""Combination rules: d = a_k * g_p + b_k * g by region k of the ratio r = g_p / g.

Regions are decided by signs and magnitudes, never by dividing g_p by g:

=====  ===========  ================================================
ckpt1  r >= 1       same sign, |g_p| >= |g|
ckpt2  0 < r < 1    same sign, |g_p| < |g|
ckpt3  r <= -1      opposite sign, |g_p| >= |g|
ckpt4  -1 < r <= 0  opposite sign or g_p = 0, |g_p| < |g|
zero   undefined    g = 0 (there d = g_p)
=====  ===========  ================================================

Every preset is a 4x2 table of coefficients (a_k, b_k), one row per region.

Implementation: with h = g_p * (g / |g|) (g_p's component along sign(g): exact, because g / |g| is
exactly +-1, and NaN where g = 0) the regions are intervals of h cut at -|g|, 0 and |g|:
ckpt3 = [h <= -|g|], ckpt4 = (-|g|, 0], ckpt2 = (0, |g|), ckpt1 = [|g|, inf). NaN compares false,
so the zero set falls out of every threshold test by itself. Four threshold masks
(h > 0, h >= |g|, h <= 0, h <= -|g|) give every region, every union of adjacent regions, and the
region counts of the statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from samstudy.optim.flat import BLOCK, FlatSpace

REGIONS = ("ckpt1", "ckpt2", "ckpt3", "ckpt4")
REGION_KEYS = (*REGIONS, "zero")

PRESETS = (
    "sgd",
    "sam",
    "same",
    "custom_same",
    "sam_magnitude_sgd_sign",
    "sgd_magnitude_sam_sign",
    "sam_where_agree",
    "sgd_where_agree",
    "saner",
    "sgd_on_region",
    "table",
)

Table = tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]
Operand = torch.Tensor | list[torch.Tensor]  # a flat buffer, or one tensor per parameter

SAM_ROW = (1.0, 0.0)
SGD_ROW = (0.0, 1.0)
IDENTITY: Table = (SAM_ROW, SAM_ROW, SAM_ROW, SAM_ROW)

_COMPILED: dict[tuple[Table, bool, bool], Callable[..., None]] = {}

# Threshold masks, in the column order of the per-tensor count matrix.
THRESHOLDS = ("gt0", "ge", "le0", "le")


def preset_table(
    name: str,
    *,
    scales: Sequence[float] | None = None,
    alpha: float | None = None,
    region: int | None = None,
    coefficients: Sequence[Sequence[float]] | None = None,
) -> Table:
    """The (a_k, b_k) rows for ckpt1..ckpt4 of preset ``name`` (knobs already validated)."""
    if name in ("sgd",):
        return (SGD_ROW, SGD_ROW, SGD_ROW, SGD_ROW)
    if name == "sam":
        return IDENTITY
    if name in ("same", "custom_same"):
        assert scales is not None
        s1, s2, s3, s4 = (float(s) for s in scales)
        return ((1.0 + s1, 0.0), (1.0 + s2, 0.0), (1.0 + s3, 0.0), (1.0 + s4, 0.0))
    if name == "sam_magnitude_sgd_sign":
        return ((1.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (-1.0, 0.0))
    if name == "sgd_magnitude_sam_sign":
        return ((0.0, 1.0), (0.0, 1.0), (0.0, -1.0), (0.0, -1.0))
    if name == "sam_where_agree":
        return ((1.0, 0.0), (1.0, 0.0), (0.0, 0.0), (0.0, 0.0))
    if name == "sgd_where_agree":
        return ((0.0, 1.0), (0.0, 1.0), (0.0, 0.0), (0.0, 0.0))
    if name == "saner":
        assert alpha is not None
        return ((1.0, 0.0), (float(alpha), 0.0), (1.0, 0.0), (1.0, 0.0))
    if name == "sgd_on_region":
        assert region is not None
        rows = [SAM_ROW] * 4
        rows[int(region) - 1] = SGD_ROW
        return tuple(rows)  # type: ignore[return-value]
    if name == "table":
        assert coefficients is not None
        return tuple((float(a), float(b)) for a, b in coefficients)  # type: ignore[return-value]
    raise ValueError(f"optimizer.name: unknown {name!r}; allowed: {', '.join(PRESETS)}")


def region_index(g: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """Region of every coordinate as int8: 0 = zero set, 1..4 = ckpt1..ckpt4 (for analysis)."""
    m = threshold_masks(g, gp)
    idx = torch.zeros(g.shape, dtype=torch.int8, device=g.device)
    idx[m["ge"]] = 1
    idx[m["gt0"] & ~m["ge"]] = 2
    idx[m["le"]] = 3
    idx[m["le0"] & ~m["le"]] = 4
    return idx


def threshold_masks(g: torch.Tensor, gp: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four threshold masks of the module docstring (allocating; the optimizer reuses buffers)."""
    ag = g.abs()
    h = gp * (g / ag)
    return {"gt0": h > 0, "ge": h >= ag, "le0": h <= 0, "le": h <= -ag}


def regions_from_thresholds(counts: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
    """Per-region counts [ckpt1, ckpt2, ckpt3, ckpt4, zero] from threshold counts (last dim 4)."""
    gt0, ge, le0, le = counts.unbind(-1)
    return torch.stack([ge, gt0 - ge, le, le0 - le, numels - gt0 - le0], dim=-1)


def _groups(table: Table) -> list[tuple[frozenset[int], float, float]]:
    """Regions sharing a non-identity coefficient pair, so each pair costs one mask."""
    by_pair: dict[tuple[float, float], set[int]] = {}
    for k, (a, b) in enumerate(table, start=1):
        if (a, b) != SAM_ROW:
            by_pair.setdefault((a, b), set()).add(k)
    return [(frozenset(ks), a, b) for (a, b), ks in by_pair.items()]


class RegionRule:
    """Applies one coefficient table to flat (g, g_p) buffers; yields threshold counts on request.

    Eager mode builds d as g_p plus one fused multiply-add per group of regions sharing a
    coefficient pair (d = g_p + M * ((a - 1) g_p + b g), exact selection by 0/1 masks), which
    is a few whole-buffer passes. ``compile=True`` runs the same rule as one ``torch.compile``d
    kernel instead (worth it on long runs; compiling costs seconds once per table).
    """

    def __init__(self, table: Table, compile: bool = False) -> None:
        self.table = table
        self.identity = table == IDENTITY
        self.groups = _groups(table)
        self.compile = compile

    def combine(
        self, space: FlatSpace, G: Operand, P: Operand, counts: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (d, per-tensor threshold counts [T, 4]); d is None for the identity table.

        ``G`` / ``P`` are flat buffers of ``space`` or lists of per-parameter tensors. Lists save
        the two gathers on CPU: the passes that read g and g_p run tensor by tensor, writing
        straight into the flat work buffers (per-tensor launches would cost more on a GPU).
        """
        want_d = not self.identity
        if not want_d and not counts:
            return None, None
        if self.compile:
            if isinstance(G, list):
                G, P = space.gather("G", G), space.gather("P", P)
            D = space.buffer("D") if want_d else None
            blocks = space.small("block_sums", (len(THRESHOLDS), space.blocks)) if counts else None
            if self._run_fused(want_d, counts, G, P, D, blocks):
                return D, (space.segment_counts(blocks) if counts else None)
        masks = _EagerMasks(space, G, P)
        D = self._apply_eager(space, masks, G, P) if want_d else None
        if counts:
            blocks = space.block_sums([masks.get(k) for k in THRESHOLDS])
            return D, space.segment_counts(blocks)
        return D, None

    def _apply_eager(
        self, space: FlatSpace, masks: _EagerMasks, G: Operand, P: Operand
    ) -> torch.Tensor:
        D = space.buffer("D")
        src: Operand = P  # the first operation writes d = g_p + ... into D, saving a copy
        for regions, a, b in self.groups:
            mask = masks.union(regions)
            if (a, b) == SGD_ROW:
                _pointwise(space, torch.lerp, D, src, G, mask)  # weight 0 or 1: exact select
            else:
                if a != 1.0:
                    _pointwise(space, torch.addcmul, D, src, P, mask, value=a - 1.0)
                    src = D
                if b != 0.0:
                    _pointwise(space, torch.addcmul, D, src, G, mask, value=b)
            src = D
        return D

    def _run_fused(self, want_d: bool, counts: bool, *args: Any) -> bool:
        """Run the compiled rule; False (after one warning) if compiling is impossible here."""
        key = (self.table, want_d, counts)
        fn = _COMPILED.get(key)
        if fn is None:  # shared by every optimizer with this table: compile once per process
            fn = torch.compile(_make_fused(self.table, want_d, counts), dynamic=False)
            _COMPILED[key] = fn
        G, P, D, blocks = args
        try:
            fn(G, P, D, blocks)
        except Exception as exc:  # no C++ compiler, unsupported backend: stay correct, eager
            warnings.warn(
                f"torch.compile of the region rule failed ({exc!r}); using eager", stacklevel=3
            )
            self.compile = False
            return False
        return True


class _EagerMasks:
    """Lazily computed 0/1 float masks over the flat buffers (persistent).

    Masks are float so that comparisons write them directly and a fused multiply-add can use
    them (bool operands take a slow mixed-dtype path); region masks are exact differences and
    sums of nested threshold masks (ckpt2 = [h > 0] - [h >= |g|], ckpt4 = [h <= 0] - [h <= -|g|]).
    """

    def __init__(self, space: FlatSpace, G: Operand, P: Operand) -> None:
        self.space = space
        # The gaps between segments must fall out of every threshold test: h = NaN there.
        self.ag = space.buffer("ag")
        self.h = space.buffer("h", fill=math.nan)
        if isinstance(G, torch.Tensor):
            torch.abs(G, out=self.ag)
            torch.div(G, self.ag, out=self.h)  # +-1, NaN where g == 0
            torch.mul(self.h, P, out=self.h)
        else:
            for g, gp, ag, h in zip(G, P, space.views("ag"), space.views("h"), strict=True):
                torch.abs(g, out=ag)
                torch.div(g, ag, out=h)
                torch.mul(h, gp, out=h)
        self._have: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        mask = self._have.get(name)
        if mask is None:
            out = self.space.buffer(name)
            if name == "gt0":
                mask = torch.gt(self.h, 0.0, out=out)
            elif name == "ge":
                mask = torch.ge(self.h, self.ag, out=out)
            elif name == "le0":
                mask = torch.le(self.h, 0.0, out=out)
            else:
                neg_ag = torch.neg(self.ag, out=out)
                mask = torch.le(self.h, neg_ag, out=out)
            self._have[name] = mask
        return mask

    def region(self, k: int) -> torch.Tensor:
        if k == 1:
            return self.get("ge")
        if k == 3:
            return self.get("le")
        outer, inner = ("gt0", "ge") if k == 2 else ("le0", "le")
        return torch.sub(self.get(outer), self.get(inner), out=self.space.buffer(f"region{k}"))

    def union(self, regions: frozenset[int]) -> torch.Tensor:
        if regions == {1, 2}:
            return self.get("gt0")
        if regions == {3, 4}:
            return self.get("le0")
        out = self.space.buffer("union")
        if regions == {1, 2, 3, 4}:
            return torch.add(self.get("gt0"), self.get("le0"), out=out)
        if len(regions) == 1:
            return self.region(next(iter(regions)))
        first, *rest = sorted(regions)
        torch.add(self.region(first), self.region(rest[0]), out=out)
        for k in rest[1:]:
            out.add_(self.region(k))
        return out


def _pointwise(space: FlatSpace, op, out: torch.Tensor, *args: Operand, **kw: Any) -> None:
    """``op(*args, out=out)`` on flat buffers, or tensor by tensor when any arg is a list."""
    if not any(isinstance(a, list) for a in args):
        op(*args, out=out, **kw)
        return
    columns = [a if isinstance(a, list) else space.views_of(a) for a in args]
    for out_i, *args_i in zip(space.views_of(out), *columns, strict=True):
        op(*args_i, out=out_i, **kw)


def _make_fused(table: Table, want_d: bool, counts: bool) -> Callable[..., None]:
    """The whole rule as one function of flat buffers, for torch.compile (writes in place)."""
    (a1, b1), (a2, b2), (a3, b3), (a4, b4) = table

    def fused(
        G: torch.Tensor, P: torch.Tensor, D: torch.Tensor | None, blocks: torch.Tensor | None
    ):
        ag = G.abs()
        h = P * (G / ag)
        gt0, ge, le0, le = h > 0, h >= ag, h <= 0, h <= -ag
        if want_d:
            a = torch.where(
                ge, a1, torch.where(gt0, a2, torch.where(le, a3, torch.where(le0, a4, 1.0)))
            )
            b = torch.where(
                ge, b1, torch.where(gt0, b2, torch.where(le, b3, torch.where(le0, b4, 0.0)))
            )
            D.copy_(a * P + b * G)
        if counts:
            sums = [m.view(-1, BLOCK).sum(1, dtype=torch.float32) for m in (gt0, ge, le0, le)]
            blocks.copy_(torch.stack(sums))

    return fused


def check_table(coefficients: object) -> Table:
    """Validate an explicit 4x2 coefficient table; ValueError names the knob."""
    msg = (
        "optimizer.coefficients: expected 4 rows [a_k, b_k] of finite numbers, one per region "
        "ckpt1..ckpt4 (d = a_k * g_p + b_k * g)"
    )
    if not isinstance(coefficients, (list, tuple)) or len(coefficients) != 4:
        raise ValueError(f"{msg}; got {coefficients!r}")
    rows = []
    for row in coefficients:
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise ValueError(f"{msg}; got row {row!r}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{msg}; got value {v!r}")
        rows.append((float(row[0]), float(row[1])))
    return tuple(rows)  # type: ignore[return-value]
