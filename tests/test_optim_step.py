"""The train_step protocol against hand-written references: presets, modes, m, ascents, stats."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from samstudy.optim import PRESETS, STAT_KEYS, create_optimizer, preset_table
from samstudy.optim.ascent import AscentConfig, ascent

RHO = 0.2
LOSS = nn.functional.cross_entropy


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))


def batch(n: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def ref_rule(table, g: torch.Tensor, gp: torch.Tensor) -> torch.Tensor:
    """design.md's region table with sign/magnitude masks, written independently."""
    same = ((g > 0) & (gp > 0)) | ((g < 0) & (gp < 0))
    big = gp.abs() >= g.abs()
    nz = g != 0
    masks = [same & big & nz, same & ~big & nz, ~same & big & nz, ~same & ~big & nz]
    d = gp.clone()
    for (a, b), m in zip(table, masks, strict=True):
        d = torch.where(m, a * gp + b * g, d)
    return d


def grads(model, x, y):
    model.zero_grad()
    LOSS(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def perturbed(model, e):
    """A copy of the model at w + e."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, ei in zip(other.parameters(), e, strict=True):
            p.add_(ei)
    return other


def sam_e(g, rho=RHO):
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
    return [rho * t / (norm + 1e-12) for t in g]


def ref_gp(model, x, y, mode: str):
    """(g, g_p) of one (micro-)batch for second-gradient ``mode``, by hand."""
    g = grads(model, x, y)
    e = sam_e(g)
    other = perturbed(model, e)
    if mode == "full":
        return g, grads(other, x, y)
    z = model(x).detach().requires_grad_()
    if mode == "jacobian":
        (delta,) = torch.autograd.grad(LOSS(z, y), z)
        other.zero_grad()
        other(x).backward(delta)
        return g, [p.grad.detach().clone() for p in other.parameters()]
    zp = other(x).detach().requires_grad_()
    (delta_p,) = torch.autograd.grad(LOSS(zp, y), zp)
    model.zero_grad()
    model(x).backward(delta_p)
    return g, [p.grad.detach().clone() for p in model.parameters()]


def delta_of_step(model, x, y, flat_sources=None, **knobs):
    before = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer(model.named_parameters(), lr=1.0, rho=RHO, **knobs)
    opt.flat_sources = flat_sources
    opt.train_step(model, LOSS, x, y)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)], opt


# Every registered two-step preset with its example knobs: a new preset is covered as it lands.
PRESET_KNOBS = [(name, p.example) for name, p in PRESETS.items() if p.two_step]


@pytest.mark.parametrize("mode", ["full", "jacobian", "logit"])
@pytest.mark.parametrize("name,knobs", PRESET_KNOBS)
def test_preset_step_equals_reference(name, knobs, mode):
    x, y = batch()
    model = mlp()
    g, gp = ref_gp(copy.deepcopy(model), x, y, mode)
    table = preset_table(name, **knobs)
    want = [ref_rule(table, a, b) for a, b in zip(g, gp, strict=True)]
    for flat_sources in (None, True):  # per-tensor sources (CPU) and gathered (GPU path)
        got, _ = delta_of_step(
            mlp(), x, y, flat_sources=flat_sources, name=name, second_grad=mode, **knobs
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "jacobian", "logit"])
def test_m_sharpness_averages_micro_batches(mode):
    x, y = batch(8)
    model = mlp()
    parts = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    want = None
    for xs, ys in parts:
        _, gp = ref_gp(copy.deepcopy(model), xs, ys, mode)
        w = xs.shape[0] / 8
        want = (
            [w * t for t in gp]
            if want is None
            else [a + w * t for a, t in zip(want, gp, strict=True)]
        )
    got, _ = delta_of_step(model, x, y, name="sam", m=3, second_grad=mode)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_m_sharpness_returns_whole_batch_loss_and_logits():
    x, y = batch(8)
    model = mlp()
    logits_want = model(x).detach()
    opt = create_optimizer(model.parameters(), name="sam", m=3)
    loss, logits = opt.train_step(model, LOSS, x, y)
    torch.testing.assert_close(logits, logits_want)
    torch.testing.assert_close(loss, LOSS(logits_want, y))


def test_rule_uses_whole_batch_gradients_with_m():
    x, y = batch(8)
    model = mlp()
    g = grads(copy.deepcopy(model), x, y)
    gp = None
    for xs, ys in [(x[:4], y[:4]), (x[4:], y[4:])]:
        _, gpi = ref_gp(copy.deepcopy(model), xs, ys, "full")
        gp = (
            [0.5 * t for t in gpi]
            if gp is None
            else [a + 0.5 * t for a, t in zip(gp, gpi, strict=True)]
        )
    table = preset_table("saner", alpha=0.1)
    want = [ref_rule(table, a, b) for a, b in zip(g, gp, strict=True)]
    got, _ = delta_of_step(model, x, y, name="saner", alpha=0.1, m=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sam", "custom_same"])
@pytest.mark.parametrize("flat_sources", [None, True])
def test_stats_equal_a_direct_computation(name, flat_sources):
    x1, y1 = batch(8, seed=1)
    x2, y2 = batch(8, seed=2)
    model = mlp()
    probe = copy.deepcopy(model)
    knobs = {"scales": [1, 0, -0.5, 1]} if name == "custom_same" else {}
    opt = create_optimizer(
        model.named_parameters(), name=name, lr=0.0, rho=RHO, stats_every=1, **knobs
    )
    opt.flat_sources = flat_sources
    want = {k: 0.0 for k in STAT_KEYS}
    counts = torch.zeros(5)
    for x, y in [(x1, y1), (x2, y2)]:
        g, gp = ref_gp(probe, x, y, "full")  # lr = 0: the weights never move
        fg, fp = torch.cat([t.reshape(-1) for t in g]), torch.cat([t.reshape(-1) for t in gp])
        want["grad_norm"] += fg.norm().item() / 2
        want["grad_norm_p"] += fp.norm().item() / 2
        want["ascent_norm"] += RHO / 2
        want["grad_cos"] += (fg @ fp / (fg.norm() * fp.norm())).item() / 2
        want["grad_ratio"] += (fp.norm() / fg.norm()).item() / 2
        same = ((fg > 0) & (fp > 0)) | ((fg < 0) & (fp < 0))
        big = fp.abs() >= fg.abs()
        nz = fg != 0
        for k, m in enumerate([same & big, same & ~big, ~same & big, ~same & ~big]):
            counts[k] += (m & nz).sum()
        counts[4] += (~nz).sum()
        opt.train_step(model, LOSS, x, y)
    shares = counts / counts.sum()
    for k, share in zip(["ckpt1", "ckpt2", "ckpt3", "ckpt4", "zero"], shares, strict=True):
        want[f"region_{k}"] = share.item()
    got = opt.read_stats()
    assert set(got) == set(STAT_KEYS)
    for k in STAT_KEYS:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    # reset: nothing measured since
    assert all(math.isnan(v) for v in opt.read_stats().values())


def test_param_stats_are_named_and_partition():
    x, y = batch()
    model = mlp()
    opt = create_optimizer(model.named_parameters(), name="same", scales=[1, 0, 0, 0])
    opt.train_step(model, LOSS, x, y)
    per = opt.read_param_stats()
    assert list(per) == [n for n, _ in model.named_parameters()]
    for shares in per.values():
        assert sum(shares.values()) == pytest.approx(1.0)
    # names come from the model when plain tensors were given
    opt2 = create_optimizer(model.parameters(), name="sam")
    opt2.train_step(model, LOSS, x, y)
    assert list(opt2.read_param_stats()) == [n for n, _ in model.named_parameters()]


def test_stats_every_counts_regions_on_sampled_steps_only():
    x, y = batch()
    model = mlp()
    n = sum(p.numel() for p in model.parameters())
    opt = create_optimizer(model.parameters(), name="sam", stats_every=3, lr=0.0)
    for _ in range(7):  # steps 0, 3, 6 are counted
        opt.train_step(model, LOSS, x, y)
    counts = opt._stats._regions.sum().item()
    assert counts == 3 * n
    assert not math.isnan(opt.read_stats()["grad_norm"])


def test_every_read_period_starts_with_a_measured_step():
    x, y = batch()
    model = mlp()
    opt = create_optimizer(model.parameters(), name="sam", lr=0.0)  # default: every 4th step
    n = sum(p.numel() for p in model.parameters())
    for _ in range(3):
        opt.train_step(model, LOSS, x, y)
        opt.train_step(model, LOSS, x, y)
        assert opt._stats._regions.sum().item() == n  # the first of the two steps only
        assert not math.isnan(opt.read_stats()["region_ckpt1"])


def test_stats_off_and_sgd_read_nan():
    x, y = batch()
    model = mlp()
    off = create_optimizer(model.parameters(), name="sam", stats=False)
    off.train_step(model, LOSS, x, y)
    assert all(math.isnan(v) for v in off.read_stats().values())
    sgd = create_optimizer(model.parameters(), name="sgd")
    assert not sgd.two_step and off.two_step
    sgd.train_step(model, LOSS, x, y)
    stats = sgd.read_stats()
    assert stats["grad_norm"] > 0
    assert math.isnan(stats["grad_norm_p"]) and math.isnan(stats["region_ckpt1"])


def test_unused_parameters_get_no_gradient_and_no_decay():
    x, y = batch()
    model = mlp()
    model.spare = nn.Parameter(torch.ones(4))  # never used in forward
    opt = create_optimizer(
        model.named_parameters(), name="custom_same", scales=[1, 0, -0.5, 1], weight_decay=0.1
    )
    opt.train_step(model, LOSS, x, y)
    assert torch.equal(model.spare.detach(), torch.ones(4))
    assert model.spare.grad is None
    assert math.isnan(opt.read_param_stats()["spare"]["ckpt1"])  # not counted


def test_frozen_parameters_are_left_alone():
    x, y = batch()
    model = mlp()
    model[0].weight.requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    opt = create_optimizer(model.parameters(), name="saner", alpha=0.5)
    opt.train_step(model, LOSS, x, y)
    assert torch.equal(model[0].weight, w0)


def test_per_group_rho():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
    w = [torch.zeros(2), torch.zeros(2)]
    e, gnorm = ascent(AscentConfig(), g, w, [0.5, 1.0])
    assert gnorm.item() == pytest.approx(5.0)
    torch.testing.assert_close(e[0], 0.5 * g[0] / 5.0)
    torch.testing.assert_close(e[1], 1.0 * g[1] / 5.0)


def test_adaptive_ascent_with_eta():
    g = [torch.tensor([1.0, -2.0, 0.5])]
    w = [torch.tensor([0.5, -1.0, 0.0])]
    e, _ = ascent(AscentConfig(kind="adaptive", eta=0.1), g, w, [0.3])
    t = w[0].abs() + 0.1
    want = 0.3 * t**2 * g[0] / (t * g[0]).norm()
    torch.testing.assert_close(e[0], want)


def test_clamp_ascent_rms_quantile_and_renorm():
    g = [torch.tensor([10.0, 1.0, -1.0, 0.5]), torch.tensor([-0.5, 0.25, 0.0, 1.0])]
    w = [torch.zeros(4), torch.zeros(4)]
    e0, _ = ascent(AscentConfig(), g, w, [1.0, 1.0])
    flat = torch.cat(e0)
    rms = flat.norm() / math.sqrt(8)
    e, _ = ascent(AscentConfig(kind="clamp", clamp_rms=1.0), g, w, [1.0, 1.0])
    torch.testing.assert_close(torch.cat(e), flat.clamp(-rms, rms))
    assert torch.cat(e).abs().max() < flat.abs().max()  # the outlier was clipped
    # quantile 0.75 of |e|: the 6th smallest of 8 magnitudes
    tau = flat.abs().sort().values[5]
    e, _ = ascent(AscentConfig(kind="clamp", clamp_quantile=0.75), g, w, [1.0, 1.0])
    torch.testing.assert_close(torch.cat(e), flat.clamp(-tau, tau))
    e, _ = ascent(AscentConfig(kind="clamp", clamp_rms=1.0, clamp_renorm=True), g, w, [1.0, 1.0])
    assert torch.cat(e).norm().item() == pytest.approx(1.0, rel=1e-6)


def test_clamp_ascent_through_train_step_shrinks_the_ascent():
    x, y = batch()
    model = mlp()
    opt = create_optimizer(model.parameters(), name="sam", ascent="clamp", clamp_rms=0.5, rho=RHO)
    opt.train_step(model, LOSS, x, y)
    assert opt.read_stats()["ascent_norm"] < RHO
    opt = create_optimizer(
        model.parameters(), name="sam", ascent="clamp", clamp_rms=0.5, clamp_renorm=True, rho=RHO
    )
    opt.train_step(model, LOSS, x, y)
    assert opt.read_stats()["ascent_norm"] == pytest.approx(RHO, rel=1e-5)


def test_batchnorm_statistics_move_once_per_step_in_every_mode():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    for mode in ("full", "jacobian", "logit"):
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
        probe = copy.deepcopy(model)
        probe(x)  # one training forward at w
        opt = create_optimizer(model.parameters(), name="sam", second_grad=mode)
        opt.train_step(model, LOSS, x, y)
        torch.testing.assert_close(model[1].running_mean, probe[1].running_mean)
        torch.testing.assert_close(model[1].running_var, probe[1].running_var)
        assert model[1].num_batches_tracked.item() == 1
        assert model[1].track_running_stats


def test_optimizer_parameters_must_belong_to_the_model():
    x, y = batch()
    model = mlp()
    opt = create_optimizer(mlp(seed=1).parameters(), name="sam")
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.train_step(model, LOSS, x, y)


class Mixed(nn.Module):
    """Parameters of two dtypes: the rule and the counts run per (device, dtype) space."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64))

    def forward(self, x):
        return self.lin(x) * self.scale.float()


@pytest.mark.parametrize("flat_sources", [None, True])
def test_mixed_dtypes_follow_the_reference(flat_sources):
    x, y = batch()
    model = Mixed()
    g, gp = ref_gp(copy.deepcopy(model), x, y, "full")
    table = preset_table("saner", alpha=0.25)
    want = [ref_rule(table, a, b) for a, b in zip(g, gp, strict=True)]
    got, opt = delta_of_step(model, x, y, flat_sources=flat_sources, name="saner", alpha=0.25)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    per = opt.read_param_stats()
    assert list(per) == [n for n, _ in model.named_parameters()]
    assert all(sum(v.values()) == pytest.approx(1.0) for v in per.values())
    stats = opt.read_stats()
    shares = [stats[f"region_{k}"] for k in ("ckpt1", "ckpt2", "ckpt3", "ckpt4", "zero")]
    assert sum(shares) == pytest.approx(1.0)
    # the global counts are the per-tensor counts summed over both spaces
    assert shares[0] == pytest.approx(
        sum(v["ckpt1"] * p.numel() for v, p in zip(per.values(), model.parameters(), strict=True))
        / sum(p.numel() for p in model.parameters())
    )


@pytest.mark.parametrize("flat_sources", [None, True])
def test_bfloat16_parameters(flat_sources):
    x, y = batch()
    model = mlp().to(torch.bfloat16)
    opt = create_optimizer(model.named_parameters(), name="custom_same", scales=[1, 0, -0.5, 1])
    opt.flat_sources = flat_sources
    loss, _ = opt.train_step(model, LOSS, x.to(torch.bfloat16), y)
    assert torch.isfinite(loss)
    stats = opt.read_stats()
    shares = [stats[f"region_{k}"] for k in ("ckpt1", "ckpt2", "ckpt3", "ckpt4", "zero")]
    assert sum(shares) == pytest.approx(1.0)
    assert 0.0 < stats["grad_cos"] <= 1.0 + 1e-6 and stats["grad_norm_p"] > 0


def bf16(device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16)


def ref_gp_bf16(model, x, y, mode: str, device_type: str = "cpu"):
    """``ref_gp`` with every forward in a bf16 autocast context of its own (fresh casts)."""

    def bf16() -> torch.autocast:
        return torch.autocast(device_type, dtype=torch.bfloat16)

    with bf16():
        g = grads(model, x, y)
    other = perturbed(model, sam_e(g))
    if mode == "full":
        with bf16():
            return g, grads(other, x, y)
    with bf16():
        z = model(x)
    if mode == "jacobian":
        (delta,) = torch.autograd.grad(LOSS(z.float(), y), z)
        other.zero_grad()
        with bf16():
            zp = other(x)
        zp.backward(delta)
        return g, [p.grad.detach().clone() for p in other.parameters()]
    with bf16():
        zp = other(x).detach().requires_grad_()
    (delta_p,) = torch.autograd.grad(LOSS(zp.float(), y), zp)
    model.zero_grad()
    z.backward(delta_p)
    return g, [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("flat_sources", [None, True])
@pytest.mark.parametrize("mode", ["full", "jacobian", "logit"])
@pytest.mark.parametrize("name", ["sam", "saner"])
def test_second_pass_under_autocast_sees_the_perturbed_weights(name, mode, flat_sources):
    # The trainer runs a whole step in one bf16 autocast context (precision auto on a GPU).
    # Autocast caches each weight's bf16 copy by the parameter, which the second pass keeps
    # (only its .data moves to w + e): unless that cache is cleared the second pass runs at w.
    x, y = batch()
    model = mlp()
    knobs = PRESETS[name].example
    g, gp = ref_gp_bf16(copy.deepcopy(model), x, y, mode)
    want = [ref_rule(preset_table(name, **knobs), a, b) for a, b in zip(g, gp, strict=True)]
    with bf16():
        got, _ = delta_of_step(model, x, y, flat_sources=flat_sources, name=name,
                               second_grad=mode, **knobs)  # fmt: skip
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast on a GPU)")
@pytest.mark.parametrize("name", ["sam", "saner"])
def test_second_pass_under_cuda_autocast_sees_the_perturbed_weights(name):
    # The CPU test above with a GPU's autocast, on a wider MLP: bf16 rounds the two ways of
    # forming w + e differently, so the step is held to a tenth of its distance from the stale
    # step (the second pass at w), not to float32 accuracy.
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(32, 64, generator=gen, device=device)
    y = torch.randint(0, 10, (32,), generator=gen, device=device)
    knobs = PRESETS[name].example
    table = preset_table(name, **knobs)
    g, gp = ref_gp_bf16(copy.deepcopy(model), x, y, "full", device_type="cuda")
    want = [ref_rule(table, a, b) for a, b in zip(g, gp, strict=True)]
    stale = [ref_rule(table, a, a) for a in g]
    with bf16("cuda"):
        got, _ = delta_of_step(model, x, y, name=name, **knobs)
    err = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    gap = max(float((a - b).abs().max()) for a, b in zip(want, stale, strict=True))
    assert err < gap / 10, (err, gap)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.Flatten(),
                        nn.Linear(3 * 2 * 2, 3))  # fmt: skip
    return net.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("flat_sources", [None, True])
def test_d_is_laid_out_like_channels_last_parameters_on_the_gpu_path(flat_sources):
    # On a GPU, foreach kernels (the base SGD step on d) launch one kernel per tensor unless
    # each gradient is laid out like its parameter: d's views must follow channels_last.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (8,), generator=gen)
    model = conv_net()
    assert model[0].weight.stride() != model[0].weight.contiguous().stride()
    g, gp = ref_gp(copy.deepcopy(model), x, y, "full")
    knobs = PRESETS["saner"].example
    want = [ref_rule(preset_table("saner", **knobs), a, b) for a, b in zip(g, gp, strict=True)]
    before = [p.detach().clone() for p in model.parameters()]
    opt = create_optimizer(model.named_parameters(), name="saner", lr=1.0, rho=RHO, **knobs)
    opt.flat_sources = flat_sources
    seen = []
    base_step = opt.base_optimizer.step
    opt.base_optimizer.step = lambda: (
        seen.extend(p.grad.stride() == p.stride() for p in model.parameters()),
        base_step(),
    )
    opt.train_step(model, LOSS, x, y)
    got = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [p.stride() for p in model.parameters()] == [p.stride() for p in conv_net().parameters()]
    if flat_sources:  # the CPU path keeps its own (contiguous) layout and its C loop
        assert seen and all(seen), seen


@pytest.mark.parametrize("flat_sources", [None, True])
def test_a_forward_after_the_step_in_the_same_autocast_context_runs_at_w(flat_sources):
    # The second pass leaves w + e's casts in autocast's cache unless it is cleared again after
    # moving back to w; lr = 0 keeps w, so a later forward must equal one in a fresh context.
    x, y = batch()
    model = mlp()
    opt = create_optimizer(model.named_parameters(), name="sam", lr=0.0, rho=RHO)
    opt.flat_sources = flat_sources
    with bf16():
        opt.train_step(model, LOSS, x, y)
        after = model(x)
    with bf16():
        fresh = model(x)
    assert torch.equal(after, fresh)


def test_a_space_laid_out_like_its_parameters_refuses_flat_segments():
    # Flat segments are read against reshape(-1) (logical order); a strided view's memory order
    # differs, so handing them out would permute d silently.
    from samstudy.optim.flat import FlatSpace

    w = conv_net()[0].weight
    space = FlatSpace([w.shape], w.device, w.dtype, [w.stride()])
    space.buffer("D")
    assert space.views("D")[0].stride() == w.stride()
    with pytest.raises(ValueError, match="flat segments"):
        space.views("D", shaped=False)
