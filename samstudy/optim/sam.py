"""``SAM``: a drop-in for the popular one-file PyTorch SAM port (same constructor, same numbers).

Usage is the port's::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)          # w -> w + e(w)
    loss_fn(model(x), y).backward()         # (freeze BatchNorm statistics here: optim.bn)
    opt.second_step(zero_grad=True)         # back to w, base step with the gradient at w + e

or ``opt.step(closure)`` after the first backward, the closure doing the second one.

Differences from the port: ``rho < 0`` and a missing closure raise ``ValueError`` (not
``assert``), and ``state_dict()`` / ``load_state_dict()`` carry the base optimizer's state
(momentum buffers, Adam moments), so a run resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from samstudy.optim.lazy_dynamo import defer_dynamo_import

defer_dynamo_import()  # constructing the optimizer needs no torch._dynamo (~1 s of imports)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al.); ``adaptive=True`` is ASAM with T_w = |w|."""

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"rho: expected a number >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to w + e(w), remembering w."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        # Autocast caches each weight's low-precision copy by the parameter: a second forward
        # in the same autocast context would reuse w's copies, not cast w + e (and then w)
        torch.clear_autocast_cache()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly (the saved copy, not w + e - e) and take the base step."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        torch.clear_autocast_cache()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """The caller has run the first forward/backward; ``closure`` runs the second."""
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that recomputes the loss and calls backward()"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self) -> torch.Tensor:
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad)
                    .norm(p=2)
                    .to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry rho and adaptive too)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer's state and share its (new) param groups again."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
