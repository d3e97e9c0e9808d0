"""Flat work buffers over a fixed list of parameter shapes.

The combination rule and the region statistics run as a handful of elementwise passes with
persistent outputs (``out=``): on CPU a fresh 45 MB tensor per operation costs more in page
faults than the arithmetic itself.

* GPU path: g and g_p are gathered into flat buffers and every pass is one whole-buffer kernel.
  Each parameter's segment starts on a multiple of ``BLOCK`` elements and the gaps stay zero,
  so per-tensor counts of a 0/1 mask are one ``view(-1, BLOCK).sum(1)`` plus a tiny reduction.
* CPU path: the passes run on ``chunks`` of at most ``CHUNK`` elements of each parameter with
  cache-sized ``scratch`` tensors, reading the gradients where autograd left them; only d is
  written to a flat buffer (the parameters' ``.grad`` are views of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BLOCK = 1024
CHUNK = 1 << 17  # elements per cache-resident piece of the CPU path (512 KB in float32)


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
        # block b belongs to tensor t when bounds[t] <= b < bounds[t + 1]
        bounds = [s // BLOCK for s in self.starts] + [self.blocks]
        self._bounds = {"blocks": torch.tensor(bounds, dtype=torch.int64, device=device)}
        self._chunks: list[tuple[int, int, int]] | None = None

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
        """A small persistent work tensor (per-block / per-chunk results) in ``acc_dtype``."""
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

    @property
    def chunks(self) -> list[tuple[int, int, int]]:
        """(tensor, start, stop) pieces of at most CHUNK elements, tensor by tensor."""
        if self._chunks is None:
            self._chunks, bounds = [], [0]
            for t, n in enumerate(self.numels):
                self._chunks += [(t, a, min(n, a + CHUNK)) for a in range(0, n, CHUNK)]
                bounds.append(len(self._chunks))
            self._bounds["chunks"] = torch.tensor(bounds, dtype=torch.int64, device=self.device)
        return self._chunks

    def scratch(self, name: str) -> torch.Tensor:
        """A persistent work tensor of CHUNK elements (cache-sized)."""
        buf = self._buffers.get(f"scratch:{name}")
        if buf is None:
            buf = torch.empty(CHUNK, device=self.device, dtype=self.dtype)
            self._buffers[f"scratch:{name}"] = buf
        return buf

    def segment_counts(self, sums: torch.Tensor, over: str) -> torch.Tensor:
        """Per-tensor totals [T, K] from sums [K, pieces] over "blocks" or "chunks" (exact)."""
        bounds = self._bounds[over]
        # float64 prefix sums over a few thousand pieces: exact for any realistic model size
        cs = torch.nn.functional.pad(sums.to(torch.float64).cumsum(1), (1, 0))
        totals = cs[:, bounds[1:]] - cs[:, bounds[:-1]]
        return totals.round().to(torch.int64).T

    def block_sums(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """[K, blocks] sums of K flat 0/1 float masks over blocks (exact: at most BLOCK each)."""
        out = self.small("block_sums", (len(masks), self.blocks))
        for row, mask in zip(out, masks, strict=True):
            torch.sum(mask.view(self.blocks, BLOCK), dim=1, dtype=self.acc_dtype, out=row)
        return out
