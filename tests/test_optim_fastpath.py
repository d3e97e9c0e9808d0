"""The step's fast paths equal its general ones, bit for bit: e in g's own storage against kept
buffers, the second pass on the model's own parameters (restored even on errors), and the CPU
rule's packed small parameters against the gathered flat path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samstudy.optim import RegionRule, create_optimizer, preset_table
from samstudy.optim.flat import CHUNK, FlatSpace
from samstudy.optim.step import _private

LOSS = nn.functional.cross_entropy


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    )


def batches(n: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen))
        for _ in range(n)
    ]


def trained(make, knobs: dict, data) -> list[torch.Tensor]:
    model = make()
    opt = create_optimizer(model.named_parameters(), lr=0.1, momentum=0.9, rho=0.3, **knobs)
    for x, y in data:
        opt.train_step(model, LOSS, x, y)
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("mode", ["full", "jacobian", "logit"])
@pytest.mark.parametrize("ascent", ["sam", "clamp"])
def test_ascent_in_gradient_storage_equals_kept_buffers(mode, ascent):
    """Statistics off: e and w + e overwrite g (not needed afterwards); measured on every step,
    g is kept and e goes to buffers of its own. The arithmetic is the same."""
    data = batches()
    knobs = {"name": "sam", "second_grad": mode, "ascent": ascent}
    fast = trained(conv_net, {**knobs, "stats": False}, data)
    kept = trained(conv_net, {**knobs, "stats_every": 1}, data)
    assert all(torch.equal(a, b) for a, b in zip(fast, kept, strict=True))


class SharedGradient(nn.Module):
    """Autograd hands w1 and w2 one and the same gradient tensor (that of w1 + w2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(5, 3 * 6 * 6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(5, 3 * 6 * 6) * 0.1)

    def forward(self, x):
        return nn.functional.linear(x.flatten(1), self.w1 + self.w2)


def test_shared_gradient_tensors_are_not_overwritten_twice():
    model = SharedGradient()
    x, y = batches(1)[0]
    g = list(torch.autograd.grad(LOSS(model(x), y), list(model.parameters())))
    assert g[0].data_ptr() == g[1].data_ptr()  # the case this guards against
    assert not _private(g, [p.data for p in model.parameters()])
    data = batches()
    fast = trained(SharedGradient, {"name": "sam", "stats": False}, data)
    kept = trained(SharedGradient, {"name": "sam", "stats_every": 1}, data)
    assert all(torch.equal(a, b) for a, b in zip(fast, kept, strict=True))
    # and both are SAM: g_p at w + rho g / ||g|| with the shared gradient counted once per weight
    model, ref = SharedGradient(), SharedGradient()
    opt = create_optimizer(model.parameters(), name="sam", lr=0.1, rho=0.3, stats=False)
    x, y = data[0]
    opt.train_step(model, LOSS, x, y)
    ps = list(ref.parameters())
    g = torch.autograd.grad(LOSS(ref(x), y), ps)
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
    with torch.no_grad():
        for p, t in zip(ps, g, strict=True):
            p.add_(0.3 * t / (norm + 1e-12))
    gp = torch.autograd.grad(LOSS(ref(x), y), ps)
    with torch.no_grad():
        for p, t in zip(ps, g, strict=True):
            p.sub_(0.3 * t / (norm + 1e-12))
        for p, t in zip(ps, gp, strict=True):
            p.sub_(0.1 * t)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Flaky(nn.Module):
    """A conv net whose forward fails on demand (the second pass of a step)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()
        self.calls = 0
        self.fail_on: int | None = None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        return self.net(x)


def test_second_pass_restores_weights_and_batchnorm_after_an_error():
    model = Flaky()
    opt = create_optimizer(model.parameters(), name="sam", lr=0.1, rho=0.3)
    x, y = batches(1)[0]
    opt.train_step(model, LOSS, x, y)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    model.fail_on = model.calls + 2  # the second pass of the next step
    with pytest.raises(RuntimeError, match="boom"):
        opt.train_step(model, LOSS, x, y)
    for name, p in model.named_parameters():
        ptr, value = before[name]
        assert p.data_ptr() == ptr and torch.equal(p.detach(), value), name
    assert model.net[1].track_running_stats
    model.fail_on = None
    opt.train_step(model, LOSS, x, y)  # and training goes on


def test_parameters_keep_their_storage_and_momentum():
    model = conv_net()
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = create_optimizer(model.parameters(), name="custom_same", scales=[1, 0, -0.5, 1])
    for x, y in batches(3):
        opt.train_step(model, LOSS, x, y)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.grad is None for p in model.parameters())


def test_packed_small_parameters_count_like_the_flat_path():
    """The chunked CPU path packs parameters of up to CHUNK / 2 elements together (a call per
    pack): d and the per-tensor counts equal the gathered flat path's and the C loop's."""
    gen = torch.Generator().manual_seed(5)
    sizes = [7, 1, CHUNK // 2 - 1, 300, CHUNK + 17, 2 * CHUNK, 5, CHUNK // 2 + 1, 64] + [3] * 40
    shapes = [torch.Size([n]) for n in sizes]
    g = [torch.randn(n, generator=gen) for n in sizes]
    gp = [t * torch.randn(t.shape, generator=gen) * 2 for t in g]
    g[3][::7] = 0.0
    gp[4][::5] = g[4][::5]  # |g_p| = |g| boundaries
    for name in ("table", "custom_same", "sgd_where_agree", "sam"):
        knobs = {
            "table": {"coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]]},
            "custom_same": {"scales": [0.5, 0, -0.5, 1.0]},
        }.get(name, {})
        results = []
        for flat, native in ((False, False), (True, False), (False, True)):
            rule = RegionRule(preset_table(name, **knobs), native=native)
            space = FlatSpace(shapes, torch.device("cpu"), torch.float32)
            G, P = (space.gather("G", g), space.gather("P", gp)) if flat else (g, gp)
            D, counts, dots = rule.combine(space, G, P, measure=True)
            d = [v.clone() for v in space.views("D")] if D is not None else None
            results.append((d, counts, dots))
        d0, c0, s0 = results[0]
        # h > 0 and h <= 0 split exactly the coordinates where g != 0
        assert (c0[:, 0] + c0[:, 2]).tolist() == [int((t != 0).sum()) for t in g], name
        for d1, c1, s1 in results[1:]:
            assert torch.equal(c0, c1), name
            if d0 is not None:
                assert all(torch.equal(a, b) for a, b in zip(d0, d1, strict=True)), name
            torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-4)


def test_gradients_laid_out_unlike_their_weights_use_kept_buffers():
    """A weight used only through its sum gets an expanded gradient (stride 0, one value): the
    ascent then keeps buffers of its own, laid out like the weight, and the result is the same."""

    class Expanded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3 * 6 * 6, 5)
            self.shift = nn.Parameter(torch.full((4, 3), 0.1))

        def forward(self, x):
            return self.lin(x.flatten(1)) + self.shift.sum()

    model = Expanded()
    x, y = batches(1)[0]
    g = list(torch.autograd.grad(LOSS(model(x), y), list(model.parameters())))
    assert g[0].stride() == (0, 0)  # the case this guards against (shift: its own first)
    assert not _private(g, [p.data for p in model.parameters()])
    data = batches()
    fast = trained(Expanded, {"name": "sam", "stats": False}, data)
    kept = trained(Expanded, {"name": "sam", "stats_every": 1}, data)
    assert all(torch.equal(a, b) for a, b in zip(fast, kept, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_c_pass_equals_the_torch_passes(dtype):
    """ASAM's w + e as one C pass (after w g's norm) is ``ascent`` followed by ``+ w`` bit for
    bit, with a radius per tensor; a tensor it cannot take (transposed) leaves it to torch."""
    from samstudy.optim.ascent import AscentConfig, adaptive_perturbed, ascent

    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (5,), (300,), (2, 3, 4)]
    g = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    w = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    rhos = [0.5, 0.5, 2.0, 0.05]
    out = [torch.empty_like(t) for t in g]
    got = adaptive_perturbed(g, w, rhos, out)
    assert got is not None and all(a is b for a, b in zip(got, out, strict=True))
    e, _ = ascent(AscentConfig(kind="adaptive"), g, w, rhos)
    want = [ei + wi for ei, wi in zip(e, w, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    transposed = [torch.empty(5, 7, dtype=dtype).t(), *out[1:]]
    assert adaptive_perturbed(g, w, rhos, transposed) is None


def test_adaptive_training_with_the_c_pass_equals_the_torch_passes(monkeypatch):
    """Whole runs, statistics off (every step takes the C pass) and on every step (none does),
    against runs where the C pass is refused: the same weights bit for bit."""
    from samstudy.optim import native

    data = batches()
    knobs = {"name": "sam", "ascent": "adaptive"}
    fast = trained(conv_net, {**knobs, "stats": False}, data)
    measured = trained(conv_net, {**knobs, "stats_every": 1}, data)
    monkeypatch.setattr(native, "adaptive_supports", lambda *args: False)
    torch_passes = trained(conv_net, {**knobs, "stats": False}, data)
    assert all(torch.equal(a, b) for a, b in zip(fast, torch_passes, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fast, measured, strict=True))
