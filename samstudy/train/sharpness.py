"""Sharpness of the training loss on a fixed batch: Hessian top eigenvalue and trace.

Both use only Hessian-vector products (double backward through the gradient), so they work for
any model without forming the Hessian: power iteration for the eigenvalue of largest magnitude
(Foret et al. report lambda_max this way) and Hutchinson's estimator E[v^T H v] with Rademacher v
for the trace. Random vectors come from a caller-given generator, so measuring never touches the
global RNG and a trial's trajectory is the same with sharpness on or off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter-shaped lists, on their device, in float64."""
    return torch.stack(
        [torch.sum(x.double() * y.double()) for x, y in zip(xs, ys, strict=True)]
    ).sum()


class HessianOperator:
    """v -> H v for the loss of ``model`` on one batch (the graph of the gradient is kept)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn(model(inputs).float(), targets)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient that does not depend on the weights (unused parameter, or linear in them
        # with a constant derivative) has a zero Hessian block: it drops out of the products.
        self.grads = [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(grads, self.params, strict=True)
        ]

    def __call__(self, vec: list[torch.Tensor]) -> list[torch.Tensor]:
        pairs = [(g, v) for g, v in zip(self.grads, vec, strict=True) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        hvp = torch.autograd.grad(
            [g for g, _ in pairs],
            self.params,
            grad_outputs=[v for _, v in pairs],
            retain_graph=True,
            allow_unused=True,
        )
        return [
            torch.zeros_like(p) if h is None else h.detach()
            for h, p in zip(hvp, self.params, strict=True)
        ]

    def random_like(self, generator: torch.Generator, rademacher: bool) -> list[torch.Tensor]:
        """Random vectors drawn on the CPU from ``generator`` (device-independent values)."""
        out = []
        for p in self.params:
            if rademacher:
                v = torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
            else:
                v = torch.randn(p.shape, generator=generator)
            out.append(v.to(device=p.device, dtype=p.dtype))
        return out


def top_eigenvalue(hessian: HessianOperator, iters: int, generator: torch.Generator) -> float:
    """Eigenvalue of largest magnitude by power iteration (the Rayleigh quotient at the end)."""
    v = hessian.random_like(generator, rademacher=False)
    norm = _dot(v, v).sqrt()
    v = [x / norm.to(x.dtype) for x in v]
    eig = 0.0
    for _ in range(iters):
        hv = hessian(v)
        # One host read per iteration: this runs every k epochs, never inside the training loop.
        eig, hv_norm = (float(t) for t in torch.stack([_dot(v, hv), _dot(hv, hv).sqrt()]).cpu())
        if hv_norm == 0.0:  # v is in the null space: H v = 0 is an eigen-pair with value 0
            return 0.0
        v = [x / hv_norm for x in hv]
    return eig


def hutchinson_trace(hessian: HessianOperator, samples: int, generator: torch.Generator) -> float:
    """Hutchinson's trace estimate: the mean of v^T H v over Rademacher vectors v."""
    quads = []
    for _ in range(samples):
        v = hessian.random_like(generator, rademacher=True)
        quads.append(_dot(v, hessian(v)))
    return float(torch.stack(quads).mean())


def measure_sharpness(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    power_iters: int = 20,
    hutchinson_samples: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """``sharpness_lambda_max`` and ``sharpness_trace`` of the loss on one batch.

    The model is measured in eval mode (BatchNorm uses its running statistics, so nothing is
    updated) and in fp32; its training mode is restored afterwards.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            hessian = HessianOperator(model, loss_fn, inputs, targets)
            lam = top_eigenvalue(hessian, power_iters, generator)
            trace = hutchinson_trace(hessian, hutchinson_samples, generator)
    finally:
        model.train(was_training)
    return {"sharpness_lambda_max": lam, "sharpness_trace": trace}
