"""The lab notes' label-noise theory, reproduced by the optimizers (Baek et al. 2024).

Binary logistic loss l = softplus(-t f) with t in {-1, +1}, lr = 1 and no momentum, so one step
moves the weights by exactly -g_p.
"""

from __future__ import annotations

import torch
from torch import nn

from samstudy.optim import create_optimizer

DIM, HIDDEN, RHO = 5, 4, 0.3


def logistic(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(-t * z.squeeze(-1)).mean()


def data(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return x, t


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(DIM, 1, bias=False).double()


def dln(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(HIDDEN, 1, bias=False)
    ).double()


def step_delta(model: nn.Module, x, t, **knobs) -> list[torch.Tensor]:
    """-(weight change) of one step: the direction d (= g_p for name 'sam')."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer(model.parameters(), lr=1.0, rho=RHO, **knobs)
    opt.train_step(model, logistic, x, t)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


def test_jsam_equals_sgd_on_a_linear_model():
    x, t = data(16)
    for _ in range(3):  # several steps from different weights
        a, b = linear(), linear()
        for _ in range(3):
            d_jsam = step_delta(a, x, t, name="sam", second_grad="jacobian")
            d_sgd = step_delta(b, x, t, name="sgd")
            torch.testing.assert_close(d_jsam, d_sgd, rtol=1e-12, atol=1e-14)


def test_logit_sam_equals_sam_with_one_example():
    x, t = data(12, seed=1)
    # one example per batch, and m = 1 over a whole batch (1-SAM)
    for xb, tb, m in [(x[:1], t[:1], None), (x[3:4], t[3:4], None), (x, t, 1)]:
        d_logit = step_delta(linear(), xb, tb, name="sam", second_grad="logit", m=m)
        d_sam = step_delta(linear(), xb, tb, name="sam", second_grad="full", m=m)
        torch.testing.assert_close(d_logit, d_sam, rtol=1e-10, atol=1e-12)


def test_lemma_3_1_per_example_gradient_norm_ratio():
    x, t = data(10, seed=2)
    model = linear(seed=3)
    w = model.weight.detach().reshape(-1)
    opt = create_optimizer(model.parameters(), name="sam", lr=0.0, rho=RHO)
    for i in range(len(x)):
        opt.train_step(model, logistic, x[i : i + 1], t[i : i + 1])
        ratio = opt.read_stats()["grad_ratio"]
        margin = t[i] * (w @ x[i])
        want = torch.sigmoid(-margin + RHO * x[i].norm()) / torch.sigmoid(-margin)
        assert abs(ratio - want.item()) < 1e-9 * want.item()


def test_one_sam_reweights_examples_as_lemma_3_1():
    """With m = 1, g_p is the mean of per-example gradients reweighted by Lemma 3.1."""
    x, t = data(10, seed=4)
    model = linear(seed=5)
    w = model.weight.detach().reshape(-1).clone()
    (d,) = step_delta(model, x, t, name="sam", m=1)
    margins = t * (x @ w)
    weights = torch.sigmoid(-margins + RHO * x.norm(dim=1))
    want = (-(t * weights)[:, None] * x).mean(0)
    torch.testing.assert_close(d.reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_proposition_4_1_jsam_on_a_two_layer_linear_network():
    for seed in range(3):
        x, t = data(1, seed=10 + seed)
        model = dln(seed)
        W = model[0].weight.detach().clone()  # HIDDEN x DIM
        v = model[1].weight.detach().reshape(-1).clone()  # HIDDEN
        xi, ti = x[0], t[0]
        z = W @ xi
        f = v @ z
        J = torch.sqrt(z.norm() ** 2 + xi.norm() ** 2 * v.norm() ** 2)
        s = torch.sigmoid(-ti * f)
        want_W = -s * torch.outer(ti * v - RHO / J * z, xi)
        want_v = -s * (ti * z - RHO * xi.norm() ** 2 / J * v)
        d_W, d_v = step_delta(model, x, t, name="sam", second_grad="jacobian")
        torch.testing.assert_close(d_W, want_W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d_v.reshape(-1), want_v, rtol=1e-10, atol=1e-12)
        # and J-SAM = SGD plus the proposition's penalties: activation norm (W), weight norm (v)
        sgd_W = -s * ti * torch.outer(v, xi)
        sgd_v = -s * ti * z
        torch.testing.assert_close(d_W - sgd_W, s * RHO / J * torch.outer(z, xi))
        torch.testing.assert_close(d_v.reshape(-1) - sgd_v, s * RHO * xi.norm() ** 2 / J * v)
