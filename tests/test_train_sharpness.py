"""Sharpness estimates against models whose Hessian is known in closed form."""

import pytest
import torch
from torch import nn

from samstudy.train.sharpness import measure_sharpness


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


class LinearWithSpare(nn.Module):
    """y = x w (no bias) plus a parameter the loss never uses (its Hessian block is 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1, bias=False)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _hessian_of_mse(x: torch.Tensor) -> torch.Tensor:
    # loss = mean((x w - y)^2)  =>  H = 2 / n * x^T x, whatever w and y are.
    return 2.0 / x.shape[0] * x.T @ x


def test_diagonal_hessian_exact() -> None:
    torch.manual_seed(0)
    scales = torch.tensor([3.0, 1.0, 0.5, 0.2])
    x = torch.cat([torch.diag(scales), -torch.diag(scales)])  # x^T x = 2 diag(scales^2)
    y = torch.randn(8, 1)
    model = LinearWithSpare(4)
    hessian = _hessian_of_mse(x)
    out = measure_sharpness(model, _mse, x, y, power_iters=100, hutchinson_samples=3)
    assert out["sharpness_lambda_max"] == pytest.approx(float(hessian.diagonal().max()), rel=1e-4)
    # Rademacher v: v^T D v = trace(D) exactly for a diagonal D, with any number of samples.
    assert out["sharpness_trace"] == pytest.approx(float(hessian.trace()), rel=1e-5)


def test_dense_hessian_against_eigvalsh() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen) @ torch.diag(torch.tensor([4.0, 1, 1, 0.5, 0.3, 0.1]))
    y = torch.randn(64, 1, generator=gen)
    model = LinearWithSpare(6)
    hessian = _hessian_of_mse(x)
    out = measure_sharpness(model, _mse, x, y, power_iters=200, hutchinson_samples=2000, seed=3)
    assert out["sharpness_lambda_max"] == pytest.approx(
        float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-3
    )
    assert out["sharpness_trace"] == pytest.approx(float(hessian.trace()), rel=0.05)


def test_two_layer_linear_network_at_a_known_point() -> None:
    # f(x) = v^T W x, loss = 0.5 (f - y)^2 at W = 0, v = e1, on one sample x = e1, y = 1.
    # There f = 0, the residual is -1, J^T J has a single 1 (at W11), and the cross terms
    # d2f/dv_i dW_i1 = x_1 = 1 enter with the residual's sign. The Hessian is block diagonal:
    # (v1, W11): [[0, -1], [-1, 1]] -> (1 +- sqrt 5) / 2; (v2, W21): [[0, -1], [-1, 0]] -> +-1;
    # the rest is zero. So lambda_max = golden ratio, trace = 1.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.copy_(torch.tensor([[1.0, 0.0]]))
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]])

    def half_sq(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - target) ** 2).sum()

    out = measure_sharpness(model, half_sq, x, y, power_iters=100, hutchinson_samples=4000)
    assert out["sharpness_lambda_max"] == pytest.approx((1 + 5**0.5) / 2, rel=1e-4)
    assert out["sharpness_trace"] == pytest.approx(1.0, abs=0.1)


def test_leaves_global_rng_and_mode_alone() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    model.train()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    running = model[1].running_mean.clone()
    before = torch.get_rng_state()
    first = measure_sharpness(model, nn.functional.cross_entropy, x, y, power_iters=5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training and torch.equal(model[1].running_mean, running)
    again = measure_sharpness(model, nn.functional.cross_entropy, x, y, power_iters=5, seed=7)
    assert first == again  # the seed fixes the random vectors
    assert first["sharpness_lambda_max"] > 0
