"""Combination rules: d = a_k * g_p + b_k * g by region k of the ratio r = g_p / g.

Regions are decided by signs and magnitudes, never by dividing g_p by g:

=====  ===========  ================================================
ckpt1  r >= 1       same sign, |g_p| >= |g|
ckpt2  0 < r < 1    same sign, |g_p| < |g|
ckpt3  r <= -1      opposite sign, |g_p| >= |g|
ckpt4  -1 < r <= 0  opposite sign or g_p = 0, |g_p| < |g|
zero   undefined    g = 0 (there d = g_p)
=====  ===========  ================================================

Every preset is a 4x2 table of coefficients (a_k, b_k), one row per region
(``samstudy.optim.presets``); this module applies a table.

Implementation: with h = g_p * (g / |g|) (g_p's component along sign(g): exact, because g / |g| is
exactly +-1, and NaN where g = 0) the regions are intervals of h cut at -|g|, 0 and |g|:
ckpt3 = [h <= -|g|], ckpt4 = (-|g|, 0], ckpt2 = (0, |g|), ckpt1 = [|g|, inf). NaN compares false,
so the zero set falls out of every threshold test by itself. Four threshold masks
(h > 0, h >= |g|, h <= 0, h <= -|g|) give every region, every union of adjacent regions, and the
region counts of the statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from samstudy.optim import native
from samstudy.optim.config import COMPILE_MODES
from samstudy.optim.flat import BLOCK, FlatSpace
from samstudy.optim.presets import IDENTITY, SAM_ROW, SGD_ROW, Table

Operand = torch.Tensor | list[torch.Tensor]  # a flat buffer, or one tensor per parameter

# One compiled rule per (want d, measure) per process; the table is an argument, so a worker that
# runs many tables (a search over coefficients) compiles once per model shape, not per table
# (torch.compile silently stops compiling a function after 8 variants).
_COMPILED: dict[tuple[bool, bool], Callable[..., None]] = {}

# ``compile: auto`` compiles the rule for CPU parameter sets at least this large, but only where
# the C loop (``native``) cannot run: that loop is twice as fast as the compiled kernel
# (ResNet-18, one thread: 4 ms against 8.5 ms, eager passes 28 ms) and costs no compile. Without
# it, one fused kernel saves tens of milliseconds per step and the one-off compile (2-20 s) is
# repaid within an epoch; smaller models would pay the compile for nothing.
AUTO_COMPILE_MIN_NUMEL = 1 << 20

# Threshold masks, in the column order of the per-tensor count matrix.
THRESHOLDS = ("gt0", "ge", "le0", "le")


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
    """Applies one coefficient table to (g, g_p); yields per-tensor threshold counts on request.

    Eager mode builds d as g_p plus one fused multiply-add per group of regions sharing a
    coefficient pair (d = g_p + M * ((a - 1) g_p + b g), M an exact 0/1 mask of the group).
    On CPU (float32 / float64) the same arithmetic runs as one C loop per tensor
    (``samstudy.optim.native``: bit for bit the eager d, one pass instead of a dozen) unless
    ``native=False`` or the library cannot be built.
    ``compile=True`` runs the whole rule as one ``torch.compile``d kernel over flat buffers
    instead (compiling costs seconds to a minute once per process and table); ``"auto"`` does
    so only for CPU spaces of at least ``AUTO_COMPILE_MIN_NUMEL`` elements where the C loop
    cannot run (GPUs stay eager: there the flat-buffer passes are a small share of a step). If
    compiling fails (no C++ compiler), the rule warns once and stays eager.
    """

    def __init__(self, table: Table, compile: bool | str = False, native: bool = True) -> None:
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile: expected true, false or 'auto', got {compile!r}")
        self.table = table
        self.identity = table == IDENTITY
        self.groups = _groups(table)
        self.compile = compile
        self.native = native
        self._native_rule: native.NativeRule | None = None
        self._coef: dict[torch.device, torch.Tensor] = {}  # the table as a compiled-kernel input

    def compiled_for(self, space: FlatSpace) -> bool:
        """Does ``combine`` run the compiled kernel for ``space``?"""
        if self.compile == "auto":
            return (
                space.device.type == "cpu"
                and space.numel >= AUTO_COMPILE_MIN_NUMEL
                and not self._native_runs(space.dtype)
            )
        return bool(self.compile)

    def _native_runs(self, dtype: torch.dtype) -> bool:
        """Can the C loop take CPU tensors of ``dtype`` (contiguous ones)?"""
        return self.native and dtype in native.DTYPES and native.library() is not None

    def combine(
        self, space: FlatSpace, G: Operand, P: Operand, measure: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Return (d, per-tensor threshold counts [T, 4], [<g, g_p>, <g_p, g_p>]).

        d is ``space``'s flat buffer "D", or None for the identity table (d = g_p); counts and
        dot products only when ``measure``. ``G`` / ``P`` are either flat buffers of ``space``
        (gathered: whole-buffer passes, the GPU path) or lists of per-parameter tensors (the
        CPU path): then every pass runs chunk by chunk of at most ``CHUNK`` elements, so that
        the dozen passes of a rule stay in cache and g, g_p are read from memory once (whole
        1 MB buffers, even of a small model, would stream every pass from memory).
        """
        want_d = not self.identity
        if not want_d and not measure:
            return None, None, None
        D = space.buffer("D") if want_d else None
        if self.compiled_for(space):
            if isinstance(G, list):
                G, P = space.gather("G", G), space.gather("P", P)
            blocks = space.small("block_sums", (len(THRESHOLDS), space.blocks)) if measure else None
            dots = space.small("dots", (2,)) if measure else None
            if self._run_fused(want_d, measure, G, P, D, blocks, dots):
                if not measure:
                    return D, None, None
                return D, space.segment_counts(blocks, "blocks"), dots.double()
        if isinstance(G, list):
            rule = self.native_for(G, P)
            if rule is not None:
                return (D, *_native_combine(rule, space, G, P, D, measure))
            return (D, *self._chunked(space, G, P, D, measure))
        masks = _Masks(G, P, space.work(None))
        if D is not None:
            self._apply(masks, G, P, D)
        if not measure:
            return D, None, None
        blocks = space.block_sums(masks.all())
        G32, P32 = (G, P) if G.dtype == space.acc_dtype else (G.float(), P.float())
        dots = torch.stack([torch.dot(G32, P32), torch.dot(P32, P32)]).double()
        return D, space.segment_counts(blocks, "blocks"), dots

    def native_for(self, G: list, P: list) -> native.NativeRule | None:
        """The C loop for these tensors, or None (switched off, unbuildable, unsupported)."""
        if not self.native or not native.NativeRule.supports(G + P):
            return None
        return self.native_rule()

    def native_rule(self) -> native.NativeRule | None:
        """The C loop with this table, or None (switched off, unbuildable), for a caller that
        checks the tensors itself (``native.sgd_step`` checks every one it steps)."""
        if not self.native:
            return None
        if self._native_rule is None:
            lib = native.library()
            if lib is None:
                self.native = False
                return None
            self._native_rule = native.NativeRule(lib, self.groups)
        return self._native_rule

    def _chunked(self, space, G: list, P: list, D, measure: bool):
        g_flat = [t.reshape(-1) for t in G]
        p_flat = [t.reshape(-1) for t in P]
        d_flat = space.views("D", shaped=False) if D is not None else None
        pieces = space.pieces()
        if measure:
            # threshold-mask sums, one row per chunk or pack member; <g, g_p>, <g_p, g_p>
            counts = space.small("piece_sums", (space.slots, len(THRESHOLDS)))
            dots = space.small("piece_dots", (len(pieces), 2))
            half = G[0].dtype != dots.dtype
            slot = 0
        for j, piece in enumerate(pieces):
            members = piece.members
            if members is None:
                t, a, b = piece.tensor, piece.start, piece.stop
                g, gp = g_flat[t][a:b], p_flat[t][a:b]
                d = d_flat[t][a:b] if d_flat is not None else None
            else:  # a pack of small parameters: copied in (and d out) with one call each
                g_in, p_in, d_out = piece.views
                torch._foreach_copy_(g_in, [g_flat[t] for t in members])
                torch._foreach_copy_(p_in, [p_flat[t] for t in members])
                g, gp, d = piece.G, piece.P, piece.D if d_flat is not None else None
            masks = _Masks(g, gp, piece.work)
            if d is not None:
                self._apply(masks, g, gp, d)
                if members is not None:
                    torch._foreach_copy_([d_flat[t] for t in members], d_out)
            if measure:
                rows = masks.all()
                if members is None:
                    torch.sum(rows, 1, out=counts[slot])
                    slot += 1
                else:  # per member: block sums, then blocks -> members (exact small sums)
                    blocks = rows.view(len(THRESHOLDS), -1, BLOCK).sum(2, dtype=counts.dtype)
                    k = len(members)
                    torch.mm(piece.segments.T, blocks.T, out=counts[slot : slot + k])
                    slot += k
                if not half:
                    torch.dot(g, gp, out=dots[j, 0])
                    torch.dot(gp, gp, out=dots[j, 1])
                else:  # half precision: accumulate in float32
                    dots[j, 0] = torch.dot(g.float(), gp.float())
                    dots[j, 1] = torch.dot(gp.float(), gp.float())
        if not measure:
            return None, None
        return space.piece_totals(counts), dots.sum(0, dtype=torch.float64)

    def _apply(self, masks: _Masks, G: torch.Tensor, P: torch.Tensor, D: torch.Tensor) -> None:
        src = P  # the first operation writes d = g_p + ... into D, saving a copy
        for regions, a, b in self.groups:
            mask = masks.union(regions)
            if (a, b) == SGD_ROW:
                torch.lerp(src, G, mask, out=D)  # weight 0 or 1: exact select
            else:
                if a != 1.0:
                    torch.addcmul(src, P, mask, value=a - 1.0, out=D)
                    src = D
                if b != 0.0:
                    torch.addcmul(src, G, mask, value=b, out=D)
            src = D

    def _run_fused(self, want_d: bool, measure: bool, *args: Any) -> bool:
        """Run the compiled rule; False (after one warning) if compiling is impossible here."""
        key = (want_d, measure)
        fn = _COMPILED.get(key)
        if fn is None:  # shared by every optimizer: compile once per process (and shape)
            fn = torch.compile(_make_fused(want_d, measure), dynamic=False)
            _COMPILED[key] = fn
        G = args[0]
        coef = self._coef.get(G.device)
        if coef is None:  # (a_k, b_k) rows, then the zero set's (1, 0): a kernel input
            rows = [*self.table, SAM_ROW]
            coef = torch.tensor(rows, dtype=torch.float32, device=G.device).T.contiguous()
            self._coef[G.device] = coef
        try:
            fn(coef, *args)
        except Exception as exc:  # no C++ compiler, unsupported backend: stay correct, eager
            warnings.warn(
                f"torch.compile of the region rule failed ({exc!r}); using the eager rule",
                stacklevel=3,
            )
            self.compile = False
            return False
        return True


def _native_combine(rule: native.NativeRule, space: FlatSpace, G: list, P: list, D, measure: bool):
    """``combine``'s (counts, dots) on CPU lists by the C loop, which writes d into ``D``."""
    d_flat = space.views("D", shaped=False) if D is not None else [None] * len(G)
    if not measure:
        for g, gp, d in zip(G, P, d_flat, strict=True):
            rule.run(g, gp, d)
        return None, None
    counts = torch.zeros(len(G), len(THRESHOLDS), dtype=torch.int64)
    dots = torch.zeros(2, dtype=torch.float64)
    for g, gp, d, row in zip(G, P, d_flat, counts, strict=True):
        rule.run(g, gp, d, row, dots)
    return counts, dots


class _Masks:
    """Lazily computed 0/1 float masks of one stretch of coordinates (g, g_p of equal length).

    ``work`` holds the outputs (``FlatSpace.work``: flat buffers, or cache-sized scratch). The
    four threshold masks are the rows of ``work["thresholds"]`` ([4, n], ``THRESHOLDS``
    order), so that their counts are one reduction. Masks are float so that comparisons write
    them directly and a fused multiply-add can use them (bool operands take a slow mixed-dtype
    path); region masks are exact differences and sums of nested threshold masks
    (ckpt2 = [h > 0] - [h >= |g|], ckpt4 = [h <= 0] - [h <= -|g|]).
    """

    def __init__(self, G: torch.Tensor, P: torch.Tensor, work: dict[str, torch.Tensor]) -> None:
        self.work = work
        self.rows = work["thresholds"]
        self.ag = torch.abs(G, out=work["ag"])
        self.h = torch.div(G, self.ag, out=work["h"])  # +-1, NaN where g == 0
        torch.mul(self.h, P, out=self.h)
        self._have = [False] * len(THRESHOLDS)

    def get(self, name: str) -> torch.Tensor:
        i = THRESHOLDS.index(name)
        out = self.rows[i]
        if not self._have[i]:
            if i == 0:
                torch.gt(self.h, 0.0, out=out)
            elif i == 1:
                torch.ge(self.h, self.ag, out=out)
            elif i == 2:
                torch.le(self.h, 0.0, out=out)
            else:  # h <= -|g| as -h >= |g| (negation is exact)
                torch.ge(torch.neg(self.h, out=self.work["minus_h"]), self.ag, out=out)
            self._have[i] = True
        return out

    def all(self) -> torch.Tensor:
        """All four threshold masks, as the rows of one [4, n] tensor."""
        for name in THRESHOLDS:
            self.get(name)
        return self.rows

    def region(self, k: int) -> torch.Tensor:
        if k == 1:
            return self.get("ge")
        if k == 3:
            return self.get("le")
        outer, inner = ("gt0", "ge") if k == 2 else ("le0", "le")
        return torch.sub(self.get(outer), self.get(inner), out=self.work[f"region{k}"])

    def union(self, regions: frozenset[int]) -> torch.Tensor:
        if regions == {1, 2}:
            return self.get("gt0")
        if regions == {3, 4}:
            return self.get("le0")
        if len(regions) == 1:
            return self.region(next(iter(regions)))
        out = self.work["union"]
        if regions == {1, 2, 3, 4}:
            return torch.add(self.get("gt0"), self.get("le0"), out=out)
        first, second, *rest = sorted(regions)
        torch.add(self.region(first), self.region(second), out=out)
        for k in rest:
            out.add_(self.region(k))
        return out


def _make_fused(want_d: bool, measure: bool) -> Callable[..., None]:
    """The whole rule as one function of flat buffers, for torch.compile (writes in place).

    ``coef`` is [2, 5]: the a and b coefficients of ckpt1..ckpt4 and of the zero set (1, 0).
    """

    def fused(coef, G, P, D, blocks, dots):
        ag = G.abs()
        h = P * (G / ag)
        gt0, ge, le0, le = h > 0, h >= ag, h <= 0, h <= -ag
        if want_d:
            a1, a2, a3, a4, a0 = coef[0].to(P.dtype).unbind()
            b1, b2, b3, b4, b0 = coef[1].to(P.dtype).unbind()
            a = torch.where(
                ge, a1, torch.where(gt0, a2, torch.where(le, a3, torch.where(le0, a4, a0)))
            )
            b = torch.where(
                ge, b1, torch.where(gt0, b2, torch.where(le, b3, torch.where(le0, b4, b0)))
            )
            D.copy_(a * P + b * G)
        if measure:
            sums = [m.view(-1, BLOCK).sum(1, dtype=blocks.dtype) for m in (gt0, ge, le0, le)]
            blocks.copy_(torch.stack(sums))
            G32, P32 = G.to(dots.dtype), P.to(dots.dtype)
            dots.copy_(torch.stack([(G32 * P32).sum(), (P32 * P32).sum()]))

    return fused
