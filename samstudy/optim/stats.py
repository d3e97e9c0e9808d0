"""Per-step optimizer statistics, accumulated on the device and read once per epoch.

Nothing here calls ``.item()`` during a step: sums and counts stay device tensors, and the read
methods move everything to the host in one transfer.
"""

from __future__ import annotations

import math

import torch

from samstudy.optim.presets import REGION_KEYS

NORM_KEYS = ("grad_norm", "grad_norm_p", "ascent_norm", "grad_cos", "grad_ratio")
STAT_KEYS = (*(f"region_{k}" for k in REGION_KEYS), *NORM_KEYS)
_TINY = 1e-30


class StepStats:
    """Device accumulators for one optimizer's statistics.

    * ``region_*``: share of coordinates in each region, over all coordinates of all measured
      steps since the last reset (the optimizer measures every ``stats_every``-th step).
    * ``grad_norm`` (||g||), ``grad_norm_p`` (||g_p||), ``ascent_norm`` (||e||; the mean over
      micro-batches with m-sharpness), ``grad_cos`` (cos(g, g_p)), ``grad_ratio``
      (||g_p|| / ||g|| of each step): means over measured steps.

    A key that was not measured since the reset reads NaN (e.g. every key but ``grad_norm`` for
    the one-pass ``sgd`` preset).
    """

    def __init__(self, num_tensors: int, device: torch.device) -> None:
        self.device = device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._norm_sums = torch.zeros(len(NORM_KEYS), dtype=dtype, device=device)
        self._norm_steps = [0] * len(NORM_KEYS)
        self._regions = torch.zeros(len(REGION_KEYS), dtype=torch.int64, device=device)
        self._param_regions = torch.zeros(
            num_tensors, len(REGION_KEYS), dtype=torch.int64, device=device
        )
        self._param_steps = 0

    def add_grad_norm(self, gnorm: torch.Tensor) -> None:
        """One-pass step: only ||g|| exists."""
        self._norm_sums[0] += gnorm.to(self._norm_sums)
        self._norm_steps[0] += 1

    def add_two_step(
        self, gnorm: torch.Tensor, gpnorm: torch.Tensor, enorm: torch.Tensor, dot: torch.Tensor
    ) -> None:
        """Norms of a two-step update (all 0-dim device tensors)."""
        gn, gpn = gnorm.to(self._norm_sums), gpnorm.to(self._norm_sums)
        cos = dot.to(self._norm_sums) / (gn * gpn).clamp_min(_TINY)
        ratio = gpn / gn.clamp_min(_TINY)
        self._norm_sums += torch.stack([gn, gpn, enorm.to(self._norm_sums), cos, ratio])
        self._norm_steps = [n + 1 for n in self._norm_steps]

    def add_regions(self, per_tensor: torch.Tensor) -> None:
        """Region counts [T, 5] (ckpt1..4, zero) of one step."""
        per_tensor = per_tensor.to(self._param_regions.device)
        self._param_regions += per_tensor
        self._regions += per_tensor.sum(0)
        self._param_steps += 1

    def read(self, reset: bool = True) -> dict[str, float]:
        """All of ``STAT_KEYS`` as floats (one host transfer)."""
        values = torch.cat([self._norm_sums.double(), self._regions.double()]).tolist()
        norms, regions = values[: len(NORM_KEYS)], values[len(NORM_KEYS) :]
        out = {}
        total = sum(regions)
        for key, count in zip(REGION_KEYS, regions, strict=True):
            out[f"region_{key}"] = count / total if total else math.nan
        for key, s, n in zip(NORM_KEYS, norms, self._norm_steps, strict=True):
            out[key] = s / n if n else math.nan
        if reset:
            self._norm_sums.zero_()
            self._norm_steps = [0] * len(NORM_KEYS)
            self._regions.zero_()
        return out

    def read_params(self, names: list[str], reset: bool = True) -> dict[str, dict[str, float]]:
        """Per-tensor region shares ``{name: {region: share}}`` (one host transfer)."""
        rows = self._param_regions.tolist()
        out = {}
        for name, row in zip(names, rows, strict=True):
            total = sum(row)
            out[name] = {
                k: (c / total if total else math.nan) for k, c in zip(REGION_KEYS, row, strict=True)
            }
        if reset:
            self._param_regions.zero_()
            self._param_steps = 0
        return out
