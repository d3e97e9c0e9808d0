"""Ascent rules: the perturbation e at which the second gradient is evaluated.

* ``sam``: e = rho * g / (||g|| + 1e-12)  (Foret et al.; the numbers of the popular port).
* ``adaptive`` (ASAM, Kwon et al.): with T_w = |w| + eta, e = rho * T_w^2 g / (||T_w g|| + 1e-12).
  eta = 0 (the default) is the popular port's ASAM, applied to every parameter.
* ``clamp`` (the lab notes' CLAMPSAM): the ``sam`` ascent with every coordinate clipped to
  [-tau, tau]; tau = clamp_rms * RMS(e) (RMS over all coordinates, RMS(e) = ||e|| / sqrt(N)) or
  the clamp_quantile-quantile of |e| (exact, by k-th value). With clamp_renorm the clipped e is
  scaled back to radius rho.

rho may differ between parameter groups (as in the port): the norm is always global, the radius
is each group's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from samstudy.optim import native
from samstudy.optim.config import DEFAULT_CLAMP_RMS

EPS = 1e-12  # the port's guard against a zero gradient


@dataclass(frozen=True)
class AscentConfig:
    """Which ascent and its knobs (validated by the factory)."""

    kind: str = "sam"
    eta: float = 0.0
    clamp_rms: float | None = None
    clamp_quantile: float | None = None
    clamp_renorm: bool = False


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all tensors, computed like the port: norm of the per-tensor norms.

    Half-precision tensors are reduced in float32 (a bfloat16 norm has 3 significant digits).
    """
    tensors = list(tensors)
    half = tensors[0].dtype in (torch.float16, torch.bfloat16)
    norms = (
        torch._foreach_norm(tensors, 2, dtype=torch.float32)
        if half
        else torch._foreach_norm(tensors)
    )
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def _scaled(
    tensors: Sequence[torch.Tensor],
    rhos: Sequence[float],
    norm: torch.Tensor,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """tensors[i] * rhos[i] / (norm + EPS), one foreach call per distinct rho.

    With ``out`` (tensors kept from step to step; or ``tensors`` themselves, in place) the
    products are written there: on CPU a fresh 45 MB per step costs more in page faults than
    the arithmetic.
    """
    result: list[torch.Tensor | None] = list(out) if out is not None else [None] * len(tensors)
    for rho in dict.fromkeys(rhos):
        idx = [i for i, r in enumerate(rhos) if r == rho]
        scale = rho / (norm + EPS)
        src = [tensors[i] for i in idx]
        if out is None:
            for i, t in zip(idx, torch._foreach_mul(src, scale), strict=True):
                result[i] = t
            continue
        dst = [out[i] for i in idx]
        if all(d is s for d, s in zip(dst, src, strict=True)):
            torch._foreach_mul_(dst, scale)
        else:  # one pass per tensor, not a copy and then a product
            for d, s in zip(dst, src, strict=True):
                torch.mul(s, scale, out=d)
    return result  # type: ignore[return-value]


@torch.no_grad()
def ascent(
    cfg: AscentConfig,
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    rhos: Sequence[float],
    out: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Return (e per tensor, ||g|| when the rule computed it anyway, else None).

    ``out``: tensors shaped like ``grads`` that receive e (otherwise e is freshly allocated);
    for ``sam`` and ``clamp`` they may be ``grads`` themselves (e in place of g).
    """
    grads = list(grads)
    if len(rhos) != len(grads) or len(weights) != len(grads):
        raise ValueError("ascent: grads, weights and rhos need one entry per tensor")
    if cfg.kind == "adaptive":
        return _adaptive(cfg, grads, list(weights), rhos, out), None
    gnorm = global_norm(grads)
    e = _scaled(grads, rhos, gnorm, out)
    if cfg.kind == "clamp":
        tau = _clamp_threshold(cfg, e)
        if tau.device.type == "cpu":  # reading tau costs nothing here: number bounds, one pass
            bound = tau.item()
            for t in e:
                t.clamp_(-bound, bound)
        else:
            # min(max(e, -tau), tau) is clamp(e, -tau, tau) bit for bit; clamp with tensor
            # bounds takes a slow unvectorised path (10x a pass), and a number bound would sync
            torch._foreach_maximum_(e, [-tau] * len(e))
            torch._foreach_minimum_(e, [tau] * len(e))
        if cfg.clamp_renorm:  # in place: e is out, or fresh tensors of its own
            e = _scaled(e, rhos, global_norm(e), e)
    return e, gnorm


def _adaptive(
    cfg: AscentConfig,
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    rhos: Sequence[float],
    out: Sequence[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """ASAM's e = rho T_w^2 g / (||T_w g|| + EPS), T_w = |w| + eta, in ``out`` when given.

    With eta = 0 the port's exact arithmetic, (w ** 2 * g) * scale, in place in ``out`` (w * w
    is w ** 2 bit for bit, and ||w g|| is || |w| g ||: signs do not change a norm), so no
    tensor is allocated per step.
    """
    if cfg.eta:
        t = torch._foreach_abs(weights)
        torch._foreach_add_(t, cfg.eta)
        norm = global_norm(torch._foreach_mul(t, grads))
        t2 = torch._foreach_mul(t, t)
        torch._foreach_mul_(t2, grads)
        return _scaled(t2, rhos, norm, out if out is not None else t2)
    if out is None:  # fresh tensors (the GPU path): one multi-tensor launch per product
        norm = global_norm(torch._foreach_mul(weights, grads))
        out = torch._foreach_mul(weights, weights)
    else:  # kept tensors (CPU): one pass per tensor, no allocation
        out = list(out)
        for o, w, g in zip(out, weights, grads, strict=True):
            torch.mul(w, g, out=o)
        norm = global_norm(out)
        for o, w in zip(out, weights, strict=True):
            torch.mul(w, w, out=o)
    torch._foreach_mul_(out, grads)
    return _scaled(out, rhos, norm, out)


@torch.no_grad()
def adaptive_perturbed(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    rhos: Sequence[float],
    out: Sequence[torch.Tensor],
) -> list[torch.Tensor] | None:
    """ASAM's (eta = 0) w + e written into ``out`` (kept CPU tensors, not ``grads``), or None
    (nothing written) where the C pass cannot take the tensors.

    w g and its norm as in :func:`_adaptive`, then e and w + e in one C pass per tensor
    (``native.adaptive_perturb``) instead of torch's four, with their roundings: bit for bit
    ``ascent`` followed by ``+ w``.
    """
    out, grads, weights = list(out), list(grads), list(weights)
    if not native.adaptive_supports(out, grads, weights):
        return None
    for o, w, g in zip(out, weights, grads, strict=True):
        torch.mul(w, g, out=o)
    norm = global_norm(out)
    # each rho's scale as _scaled computes it, read once (no sync on a CPU)
    scale_of = {rho: (rho / (norm + EPS)).item() for rho in dict.fromkeys(rhos)}
    native.adaptive_perturb(out, grads, weights, [scale_of[rho] for rho in rhos])
    return out


def _clamp_threshold(cfg: AscentConfig, e: Sequence[torch.Tensor]) -> torch.Tensor:
    n = sum(t.numel() for t in e)
    if cfg.clamp_quantile is not None:
        flat = torch.cat([t.reshape(-1) for t in e]).abs_()
        k = min(n, max(1, math.ceil(cfg.clamp_quantile * n)))
        return torch.kthvalue(flat, k).values
    rms = global_norm(e) / math.sqrt(n)
    return (cfg.clamp_rms if cfg.clamp_rms is not None else DEFAULT_CLAMP_RMS) * rms
