"""Flat work buffers over a fixed list of parameter shapes.

The combination rule and the region statistics run as a handful of whole-buffer operations over
one flat vector per quantity (g, g_p, d, masks) instead of one small kernel per parameter tensor.
Buffers are allocated once and reused with ``out=``: on CPU a fresh 45 MB tensor per operation
costs more in page faults than the arithmetic itself.

Each parameter's segment starts on a multiple of ``BLOCK`` elements and the gaps stay zero, so
per-tensor counts of a 0/1 mask are one ``view(-1, BLOCK).sum(1)`` over the whole buffer plus a
tiny per-block reduction, instead of one reduction per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 1024


class FlatSpace:
    """Persistent flat buffers (and cached per-parameter views) for tensors of given shapes."""

    def __init__(
        self, shapes: Sequence[torch.Size], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
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
        self._names: dict[int, str] = {}
        # block b belongs to tensor t when bounds[t] <= b < bounds[t + 1]
        bounds = [s // BLOCK for s in self.starts] + [self.blocks]
        self._block_bounds = torch.tensor(bounds, dtype=torch.int64, device=device)

    def buffer(
        self, name: str, dtype: torch.dtype | None = None, fill: float = 0.0
    ) -> torch.Tensor:
        """The flat buffer ``name``; filled with ``fill`` on first use (the gaps keep it)."""
        buf = self._buffers.get(name)
        if buf is None:
            dtype = dtype or self.dtype
            buf = torch.full((self.numel,), fill, device=self.device, dtype=dtype)
            self._buffers[name] = buf
            self._names[id(buf)] = name
        return buf

    def views_of(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter (shaped) views of one of this space's flat buffers."""
        return self.views(self._names[id(buf)])

    def small(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A small persistent float32 work tensor (per-block results)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != torch.Size(shape):
            buf = torch.zeros(shape, device=self.device, dtype=torch.float32)
            self._buffers[name] = buf
        return buf

    def views(self, name: str, shaped: bool = True) -> list[torch.Tensor]:
        """Per-parameter views of buffer ``name``: shaped like the parameters, or 1-D segments."""
        key = (name, shaped)
        views = self._views.get(key)
        if views is None:
            buf = self._buffers[name]
            views = [
                buf[a : a + n].view(shape) if shaped else buf[a : a + n]
                for a, n, shape in zip(self.starts, self.numels, self.shapes, strict=True)
            ]
            self._views[key] = views
        return views

    def gather(self, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Copy ``tensors`` (one per parameter, in order) into the flat buffer ``name``."""
        buf = self.buffer(name)
        torch._foreach_copy_(self.views(name), list(tensors))
        return buf

    def segment_counts(self, block_sums: torch.Tensor) -> torch.Tensor:
        """Per-tensor totals [T, K] from per-block sums [K, blocks] of 0/1 masks (exact)."""
        # float64 prefix sums over a few thousand blocks: exact for any realistic model size
        cs = torch.nn.functional.pad(block_sums.to(torch.float64).cumsum(1), (1, 0))
        totals = cs[:, self._block_bounds[1:]] - cs[:, self._block_bounds[:-1]]
        return totals.round().to(torch.int64).T

    def block_sums(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[K, blocks] sums of K flat 0/1 float masks over blocks (exact: at most BLOCK each)."""
        out = self.small("block_sums", (len(masks), self.blocks))
        for row, mask in zip(out, masks, strict=True):
            torch.sum(mask.view(self.blocks, BLOCK), dim=1, dtype=torch.float32, out=row)
        return out
