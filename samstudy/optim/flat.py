"""Flat work buffers over a fixed list of parameter shapes.

The combination rule and the region statistics run as a handful of elementwise passes with
persistent outputs (``out=``): on CPU a fresh 45 MB tensor per operation costs more in page
faults than the arithmetic itself.

* GPU path: g and g_p are gathered into flat buffers and every pass is one whole-buffer kernel.
  Each parameter's segment starts on a multiple of ``BLOCK`` elements and the gaps stay zero,
  so per-tensor counts of a 0/1 mask are one ``view(-1, BLOCK).sum(1)`` plus a tiny reduction.
* CPU path: the passes run on :class:`Piece` s of at most ``CHUNK`` elements with cache-sized
  work tensors: chunks of the large parameters, read where autograd left them, and packs of the
  small ones (copied together, so that a bias costs no dozen calls of its own); only d is
  written to a flat buffer (the parameters' ``.grad`` are views of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 1024
# Elements per cache-resident piece of the CPU path (512 KB in float32): the work tensors of a
# rule stay in cache between passes, and a small model is a handful of pieces (each costs a
# dozen calls: the 0.3M-parameter MLP is 3 of them).
CHUNK = 1 << 17
# the rule's work tensors besides the four threshold-mask rows (``rules._Masks``)
_WORK = ("ag", "h", "minus_h", "region2", "region4", "union")


@dataclass
class Piece:
    """A stretch of at most ``CHUNK`` coordinates that the CPU path processes at once.

    A chunk of one large parameter (``tensor``, ``start``, ``stop``: a slice of its flat view),
    or a pack of whole small parameters (``members``) laid out on whole blocks of the packed
    buffers ``G`` / ``P`` / ``D`` (the gaps stay zero, so masks count nothing there).
    """

    n: int
    work: dict[str, torch.Tensor]
    tensor: int = -1
    start: int = 0
    stop: int = 0
    members: list[int] | None = None
    G: torch.Tensor | None = None
    P: torch.Tensor | None = None
    D: torch.Tensor | None = None
    views: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
    segments: torch.Tensor | None = None  # [blocks, members]: block b belongs to member m


def _dense(shape: torch.Size, stride: Sequence[int]) -> bool:
    """Does a tensor of ``shape`` and ``stride`` cover exactly ``shape.numel()`` consecutive
    elements (a permutation of the contiguous layout, e.g. channels_last)?"""
    expected = 1
    for st, size in sorted((st, size) for st, size in zip(stride, shape, strict=True) if size != 1):
        if st != expected:
            return False
        expected *= size
    return True


class FlatSpace:
    """Persistent flat buffers (and cached per-parameter views) for tensors of given shapes."""

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        device: torch.device,
        dtype: torch.dtype,
        strides: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        """``strides``: lay each shaped view out like its parameter (channels_last, say) where
        that layout is dense. The GPU path passes them: multi-tensor kernels (the gathers, the
        base optimizer's foreach step on d) take their fast route only when every tensor is
        laid out like its partner, else they launch one kernel per tensor. The CPU path, which
        reads segments as flat runs in the parameters' logical order, passes none."""
        self.shapes = [torch.Size(s) for s in shapes]
        self.strides = [
            tuple(st) if st is not None and _dense(shape, st) else None
            for shape, st in zip(self.shapes, strides or [None] * len(self.shapes), strict=True)
        ]
        self.numels = [s.numel() for s in self.shapes]
        self.starts: list[int] = []
        end = 0
        for n in self.numels:
            self.starts.append(end)
            end += -(-n // BLOCK) * BLOCK  # round each segment up to whole blocks
        self.numel = end
        self.blocks = end // BLOCK
        self.device = device
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[str, bool], list[torch.Tensor]] = {}
        # block b belongs to tensor t when bounds[t] <= b < bounds[t + 1]
        bounds = [s // BLOCK for s in self.starts] + [self.blocks]
        self._bounds = {"blocks": torch.tensor(bounds, dtype=torch.int64, device=device)}
        self._pieces: list[Piece] | None = None
        self._work: dict[int | None, dict[str, torch.Tensor]] = {}

    def buffer(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The flat buffer ``name``; zero on first use (the gaps between segments stay zero)."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.zeros(self.numel, device=self.device, dtype=dtype or self.dtype)
            self._buffers[name] = buf
        return buf

    @property
    def acc_dtype(self) -> torch.dtype:
        """Accumulation dtype of per-piece sums: the space's own, float32 for half types."""
        return self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32

    def small(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A small persistent work tensor (per-block / per-piece results) in ``acc_dtype``."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != torch.Size(shape):
            buf = torch.zeros(shape, device=self.device, dtype=self.acc_dtype)
            self._buffers[name] = buf
        return buf

    def views(self, name: str, shaped: bool = True) -> list[torch.Tensor]:
        """Per-parameter views of buffer ``name``: shaped like the parameters, or 1-D segments."""
        key = (name, shaped)
        views = self._views.get(key)
        if views is None:
            if not shaped and any(st is not None for st in self.strides):
                # a segment's run is in memory order, a tensor's reshape(-1) in logical order
                raise ValueError("flat segments of a space laid out like its parameters")
            buf = self._buffers[name]
            views = [
                buf[a : a + n]
                if not shaped
                else buf[a : a + n].view(shape)
                if stride is None
                else buf.as_strided(shape, stride, buf.storage_offset() + a)
                for a, n, shape, stride in zip(
                    self.starts, self.numels, self.shapes, self.strides, strict=True
                )
            ]
            self._views[key] = views
        return views

    def gather(self, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Copy ``tensors`` (one per parameter, in order) into the flat buffer ``name``."""
        buf = self.buffer(name)
        torch._foreach_copy_(self.views(name), list(tensors))
        return buf

    def work(self, n: int | None) -> dict[str, torch.Tensor]:
        """The rule's work tensors (``rules._Masks``): flat buffers for ``n = None`` (zero on
        first use: the gaps between segments stay zero), else views of the first ``n``
        elements of cache-sized scratch (cached per length)."""
        work = self._work.get(n)
        if work is None:
            if n is None:
                work = {name: self.buffer(f"work:{name}") for name in _WORK}
                work["thresholds"] = self._zeros(4, self.numel)
            else:
                scratch = self._work.get(-1)  # the scratch itself: CHUNK elements each
                if scratch is None:
                    scratch = {name: self._empty(CHUNK) for name in _WORK}
                    scratch["thresholds"] = self._empty(4, CHUNK)
                    self._work[-1] = scratch
                work = {name: t[..., :n] for name, t in scratch.items()}
            self._work[n] = work
        return work

    def pieces(self) -> list[Piece]:
        """The CPU path's pieces: chunks of parameters of more than ``CHUNK // 2`` elements,
        then packs of the smaller ones (each member on whole blocks), built once."""
        if self._pieces is None:
            self._pieces = self._make_pieces()
        return self._pieces

    def _make_pieces(self) -> list[Piece]:
        pieces: list[Piece] = []
        small = []
        for t, n in enumerate(self.numels):
            if n <= CHUNK // 2:
                small.append(t)
                continue
            for a in range(0, n, CHUNK):
                b = min(n, a + CHUNK)
                pieces.append(Piece(b - a, self.work(b - a), tensor=t, start=a, stop=b))
        packs: list[list[int]] = []
        size = CHUNK
        for t in small:
            blocks = -(-self.numels[t] // BLOCK) * BLOCK
            if size + blocks > CHUNK:
                packs.append([])
                size = 0
            packs[-1].append(t)
            size += blocks
        total = sum(-(-self.numels[t] // BLOCK) * BLOCK for t in small)
        packed = {name: self._zeros(total) for name in "GPD"}
        offset = 0
        for members in packs:
            starts, n = [], 0
            for t in members:
                starts.append(n)
                n += -(-self.numels[t] // BLOCK) * BLOCK
            segments = torch.zeros(
                n // BLOCK, len(members), dtype=self.acc_dtype, device=self.device
            )
            for m, (t, a) in enumerate(zip(members, starts, strict=True)):
                segments[a // BLOCK : (a + self.numels[t] - 1) // BLOCK + 1, m] = 1
            G, P, D = (packed[name][offset : offset + n] for name in "GPD")

            def member_views(buf: torch.Tensor, members=members, starts=starts) -> list:
                return [buf[a : a + self.numels[t]] for t, a in zip(members, starts, strict=True)]

            views = (member_views(G), member_views(P), member_views(D))
            work = self.work(n)
            pieces.append(
                Piece(n, work, members=members, G=G, P=P, D=D, views=views, segments=segments)
            )
            offset += n
        # per-tensor totals from per-piece (chunk) or per-member (pack) sums: one product
        owner = torch.zeros(self._piece_slots(pieces), len(self.numels), dtype=torch.float64)
        slot = 0
        for piece in pieces:
            for t in piece.members if piece.members is not None else [piece.tensor]:
                owner[slot, t] = 1
                slot += 1
        self._owner = owner.to(self.device)
        return pieces

    @staticmethod
    def _piece_slots(pieces: list[Piece]) -> int:
        return sum(len(p.members) if p.members is not None else 1 for p in pieces)

    @property
    def slots(self) -> int:
        """Rows of the per-piece sums: one per chunk and one per member of a pack."""
        return self._piece_slots(self.pieces())

    def piece_totals(self, sums: torch.Tensor) -> torch.Tensor:
        """Per-tensor totals [T, K] (int64, exact) from per-slot sums [slots, K]."""
        self.pieces()
        return torch.mm(self._owner.T, sums.to(torch.float64)).round().to(torch.int64)

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=self.device, dtype=self.dtype)

    def _empty(self, *shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=self.device, dtype=self.dtype)

    def segment_counts(self, sums: torch.Tensor, over: str) -> torch.Tensor:
        """Per-tensor totals [T, K] from sums [K, blocks] over "blocks" (exact)."""
        bounds = self._bounds[over]
        # float64 prefix sums over a few thousand pieces: exact for any realistic model size
        cs = torch.nn.functional.pad(sums.to(torch.float64).cumsum(1), (1, 0))
        totals = cs[:, bounds[1:]] - cs[:, bounds[:-1]]
        return totals.round().to(torch.int64).T

    def block_sums(self, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[K, blocks] sums of K flat 0/1 float masks over blocks (exact: at most BLOCK each);
        ``masks`` is a [K, numel] tensor (one reduction) or a sequence of flat masks."""
        out = self.small("block_sums", (len(masks), self.blocks))
        if isinstance(masks, torch.Tensor):
            blocks = masks.view(len(masks), self.blocks, BLOCK)
            torch.sum(blocks, dim=2, dtype=self.acc_dtype, out=out)
            return out
        for row, mask in zip(out, masks, strict=True):
            torch.sum(mask.view(self.blocks, BLOCK), dim=1, dtype=self.acc_dtype, out=row)
        return out
