"""The C region rule (``samstudy.optim.native``) against the eager passes it replaces on CPU:
d and the region counts bit for bit, the dot products to float64 accuracy, whole training runs
identical; and the way it is built, cached, switched off and replaced when it cannot be built."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from samstudy.models import create_model
from samstudy.optim import RegionRule, create_optimizer, native
from samstudy.optim.flat import FlatSpace
from tests.test_optim_rules import TABLES, boundary_and_random_pairs

LOSS = torch.nn.functional.cross_entropy


def combine(table, g: list[torch.Tensor], gp: list[torch.Tensor], use_native: bool, measure=True):
    space = FlatSpace([t.shape for t in g], torch.device("cpu"), g[0].dtype)
    rule = RegionRule(table, native=use_native)
    D, counts, dots = rule.combine(space, g, gp, measure=measure)
    if measure or not rule.identity:  # the path asked for ran
        assert (rule._native_rule is not None) == use_native
    d = [v.clone() for v in space.views("D")] if D is not None else None
    return d, counts, dots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(TABLES))
def test_native_rule_equals_eager_bit_for_bit(name, dtype):
    """Boundaries, zeros of both signs, subnormals and random pairs, in tensors of odd lengths
    (the vector loop's tails), with and without measuring."""
    g, gp = boundary_and_random_pairs(5000, seed=7)
    g, gp = g.to(dtype), gp.to(dtype)
    gp[100:400] = g[100:400] * torch.linspace(-2, 2, 300, dtype=dtype)  # r = +-1 included
    spans = list(itertools.pairwise([0, 3, 40, 1017, 3000, len(g)]))
    G = [g[a:b].clone() for a, b in spans]
    G[2] = G[2].view(-1, 1)  # a 2-d parameter
    P = [gp[a:b].clone().view_as(t) for (a, b), t in zip(spans, G, strict=True)]
    for measure in (True, False):
        d_c, c_c, s_c = combine(TABLES[name], G, P, use_native=True, measure=measure)
        d_e, c_e, s_e = combine(TABLES[name], G, P, use_native=False, measure=measure)
        if d_e is None:
            assert d_c is None
        else:
            assert all(torch.equal(a, b) for a, b in zip(d_c, d_e, strict=True)), name
        if measure:
            assert torch.equal(c_c, c_e), name
            g64, gp64 = g.double(), gp.double()
            want = torch.stack([g64 @ gp64, gp64 @ gp64])
            torch.testing.assert_close(s_c, want, rtol=1e-12, atol=0)  # float64 sums
            torch.testing.assert_close(s_e, want, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize(
    "knobs",
    [
        {"name": "sam"},
        {"name": "same", "scales": [1, 0, 0, 0]},
        {"name": "custom_same", "scales": [1, 0, -0.5, 1]},
        {"name": "saner", "alpha": 0.25},
        {"name": "table", "coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]]},
    ],
    ids=lambda k: k["name"],
)
def test_training_with_the_native_rule_equals_eager(knobs):
    """Ten steps of the digits-sized MLP with momentum and statistics on every step: the same
    weights bit for bit, the same region counts, the same statistics to float32 accuracy."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(10)
    ]
    runs = []
    for use_native in (True, False):
        torch.manual_seed(0)
        model = create_model("mlp", num_classes=10, in_shape=(1, 8, 8), width=64)
        opt = create_optimizer(
            model.named_parameters(), lr=0.1, momentum=0.9, rho=0.2, stats_every=1, **knobs
        )
        opt.rule.native = use_native
        for x, y in batches:
            opt.train_step(model, LOSS, x, y)
        assert (opt.rule._native_rule is not None) == use_native
        runs.append(([p.detach().clone() for p in model.parameters()], opt.read_stats()))
    (w_n, s_n), (w_e, s_e) = runs
    assert all(torch.equal(a, b) for a, b in zip(w_n, w_e, strict=True))
    assert s_n.keys() == s_e.keys()
    for key in s_e:
        assert s_n[key] == pytest.approx(s_e[key], rel=1e-5, nan_ok=True), key


@pytest.mark.parametrize("name", sorted(TABLES))
def test_non_finite_gradients_fall_where_the_eager_rule_puts_them(name):
    """An infinite or NaN g has no region (h is NaN), as in the eager rule, so the counts agree.
    d agrees on the finite pairs; where g or g_p is not finite (a diverged step) the C loop
    gives a non-finite d, and the eager passes a non-finite d or g_p unchanged."""
    inf, nan = math.inf, math.nan
    g = torch.tensor([inf, -inf, nan, 1.0, -1.0, 2.0, 0.0, inf, 3.0, -2.0])
    gp = torch.tensor([1.0, -1.0, 1.0, inf, nan, -inf, nan, nan, 1.5, 0.5])
    d_c, c_c, _ = combine(TABLES[name], [g], [gp], use_native=True)
    d_e, c_e, _ = combine(TABLES[name], [g], [gp], use_native=False)
    assert torch.equal(c_c, c_e)
    assert int(c_c[0, 0] + c_c[0, 2]) == 4  # finite g != 0 with a g_p that is not NaN
    if d_e is not None:
        assert torch.equal(d_c[0][-2:], d_e[0][-2:])
        assert not d_c[0][:-2].isfinite().any()


def test_unsupported_tensors_take_the_eager_passes():
    """Half precision and non-contiguous gradients (channels_last) stay on the eager path."""
    g, gp = boundary_and_random_pairs(200, seed=1)
    assert native.NativeRule.supports([g, gp])
    assert not native.NativeRule.supports([g.half(), gp.half()])
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    assert not native.NativeRule.supports([x])
    rule = RegionRule(TABLES["dense"])
    space = FlatSpace([g.shape], torch.device("cpu"), torch.bfloat16)
    D, counts, _ = rule.combine(space, [g.bfloat16()], [gp.bfloat16()], measure=True)
    assert rule._native_rule is None and rule.native  # eager here, still native elsewhere
    assert int(counts.sum()) > 0 and D is not None


def _in_subprocess(code: str, **env: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


PROBE = """
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from samstudy.optim import RegionRule, native
from samstudy.optim.flat import FlatSpace
g, gp = torch.randn(1000), torch.randn(1000)
rule = RegionRule(((2.0, 0.0), (1.0, 0.0), (1.0, 0.0), (0.0, 1.0)))
space = FlatSpace([g.shape], torch.device("cpu"), torch.float32)
D, counts, dots = rule.combine(space, [g], [gp], measure=True)
eager = RegionRule(rule.table, native=False)
D2, counts2, _ = eager.combine(FlatSpace([g.shape], torch.device("cpu"), torch.float32), [g], [gp], measure=True)
assert torch.equal(D, D2) and torch.equal(counts, counts2)
print("native" if rule._native_rule is not None else "eager", native.cache_dir())
"""


def test_library_is_built_once_into_the_cache(tmp_path):
    """A fresh cache gets one library; a second process loads it (no compiler needed then)."""
    cache = tmp_path / "kernels"
    first = _in_subprocess(PROBE, SAMSTUDY_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["native", str(cache)]
    built = list(cache.glob("rule-*.so"))
    assert len(built) == 1 and not [p for p in cache.iterdir() if p not in built]  # no temp left
    mtime = built[0].stat().st_mtime_ns
    again = _in_subprocess(PROBE, SAMSTUDY_KERNEL_CACHE=str(cache), PATH="/nonexistent")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == "native"
    assert built[0].stat().st_mtime_ns == mtime


def test_without_a_compiler_the_rule_warns_once_and_stays_exact(tmp_path):
    missing = str(tmp_path / "no-such-cc")
    proc = _in_subprocess(
        PROBE + "D3, *_ = rule.combine(space, [g], [gp], measure=False)\n",
        SAMSTUDY_KERNEL_CACHE=str(tmp_path / "kernels"),
        CC=missing,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "eager"
    assert proc.stderr.count("the C kernels could not be built") == 1, proc.stderr
    assert missing in proc.stderr and "SAMSTUDY_NATIVE_KERNEL=0" in proc.stderr


def test_switched_off_by_the_environment(tmp_path):
    cache = tmp_path / "kernels"
    proc = _in_subprocess(PROBE, SAMSTUDY_KERNEL_CACHE=str(cache), SAMSTUDY_NATIVE_KERNEL="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "eager" and "could not be built" not in proc.stderr
    assert not cache.exists()


# -- the SGD step ------------------------------------------------------------------------------

SGD_SETTINGS = [
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    {"lr": 0.3, "momentum": 0.5, "dampening": 0.25, "maximize": True},
    {"lr": 0.2},
    {"lr": 0.2, "weight_decay": 0.01, "foreach": False},
]


def _sgd_pair(dtype, settings, shapes=((37,), (8, 5), (3, 1, 2, 2))):
    """Tensors of odd sizes (the vector loop's tails) in two groups, the second with its own lr;
    an SGD with ``settings`` on them and torch's single-tensor SGD on copies."""
    gen = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=gen, dtype=dtype, requires_grad=True) for s in shapes]
    theirs = [t.detach().clone().requires_grad_() for t in ours]

    def groups(ts):
        return [{"params": ts[:2]}, {"params": ts[2:], "lr": settings["lr"] / 3}]

    opt = torch.optim.SGD(groups(ours), **settings)
    return ours, theirs, opt, torch.optim.SGD(groups(theirs), **{**settings, "foreach": False})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_native_sgd_step_is_torch_sgd_bit_for_bit(dtype, settings):
    """Parameters and momentum buffers equal torch's single-tensor SGD after every step, across
    an lr change, with a parameter that has no gradient on one step; state dicts alike."""
    ours, theirs, opt, ref = _sgd_pair(dtype, settings)
    gen = torch.Generator().manual_seed(4)
    for step in range(5):
        if step == 3:
            for group in (*opt.param_groups, *ref.param_groups):
                group["lr"] *= 0.5
        for a, b in zip(ours, theirs, strict=True):
            a.grad = (
                None
                if (step == 1 and a.ndim == 2)
                else torch.randn(a.shape, generator=gen, dtype=dtype)
            )
            b.grad = None if a.grad is None else a.grad.clone()
        version = ours[0]._version
        assert native.sgd_step(opt)
        assert ours[0]._version > version  # autograd sees the in-place update, as with torch's
        ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), step
    mine, want = opt.state_dict(), ref.state_dict()
    assert mine["state"].keys() == want["state"].keys()
    for key, state in want["state"].items():
        assert torch.equal(mine["state"][key]["momentum_buffer"], state["momentum_buffer"])


def test_native_sgd_leaves_what_it_does_not_cover_to_torch():
    """Nothing is done (False, parameters untouched) where the C loop is not torch's step."""

    def declined(opt, params) -> bool:
        before = [p.detach().clone() for p in params]
        result = native.sgd_step(opt)
        return not result and all(torch.equal(a, b) for a, b in zip(before, params, strict=True))

    def with_grads(*params):
        for p in params:
            p.grad = torch.ones_like(p)
        return list(params)

    p = with_grads(torch.randn(6, requires_grad=True))
    for kwargs in ({"foreach": True}, {"fused": True}, {"differentiable": True}):
        assert declined(torch.optim.SGD(p, lr=0.1, **kwargs), p), kwargs
    assert declined(torch.optim.SGD(p, lr=torch.tensor(0.1)), p)  # a tensor lr
    assert declined(torch.optim.AdamW(p, lr=0.1), p)
    hooked = torch.optim.SGD(p, lr=0.1)
    handle = hooked.register_step_pre_hook(lambda *_: None)
    assert declined(hooked, p)
    handle.remove()
    handle = register_optimizer_step_post_hook(lambda *_: None)
    try:
        assert declined(hooked, p)
    finally:
        handle.remove()
    assert native.sgd_step(hooked)  # hooks gone: the C loop runs
    wrapped = torch.optim.SGD(p, lr=0.1)
    wrapped.step = wrapped.step  # an instance-level step (a scheduler's wrapper) must run
    assert declined(wrapped, p)
    loaded = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    loaded.state[p[0]]["momentum_buffer"] = torch.zeros(3)  # a state dict of another model
    assert declined(loaded, p)
    odd = with_grads(torch.randn(4, 6).t().contiguous().t().detach().requires_grad_())
    assert not odd[0].is_contiguous() and declined(torch.optim.SGD(odd, lr=0.1), odd)
    half = with_grads(torch.randn(6, dtype=torch.bfloat16, requires_grad=True))
    assert declined(torch.optim.SGD(half, lr=0.1), half)


def test_native_sgd_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SAMSTUDY_NATIVE_KERNEL", "0")
    p = torch.randn(5, requires_grad=True)
    p.grad = torch.ones(5)
    assert not native.sgd_step(torch.optim.SGD([p], lr=0.1))


def test_native_sgd_leaves_large_tensors_to_torch_on_many_threads():
    """Above two threads torch splits a large tensor's passes across them; the C loop does not."""
    small = [torch.randn(100, requires_grad=True)]
    large = [torch.randn(40000, requires_grad=True)]
    for p in (*small, *large):
        p.grad = torch.ones_like(p)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert native.sgd_step(torch.optim.SGD(small, lr=0.1))
        assert not native.sgd_step(torch.optim.SGD(large, lr=0.1))
        torch.set_num_threads(2)
        assert native.sgd_step(torch.optim.SGD(large, lr=0.1))
    finally:
        torch.set_num_threads(threads)


# -- the rule and the SGD step in one loop -----------------------------------------------------


class _MlpAndIdleParam(torch.nn.Module):
    """The digits MLP (float64 where asked) plus a parameter that gets no gradient on the
    steps where ``skip`` is set (``used`` is then a mask, and that parameter takes no step)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.mlp = create_model("mlp", num_classes=10, in_shape=(1, 8, 8), width=37).to(dtype)
        self.extra = torch.nn.Parameter(torch.ones(10, dtype=dtype))
        self.skip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return out if self.skip else out * self.extra


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize(
    "knobs",
    [
        {"name": "same", "scales": [1, 0, 0, 0]},
        {"name": "sgd_where_agree"},
        {"name": "table", "coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]]},
        {"name": "saner", "alpha": 0.25, "m": 8},
    ],
    ids=lambda k: k["name"],
)
def test_rule_and_sgd_in_one_loop_equal_the_two_loops(knobs, settings, dtype):
    """Steps that measure nothing take d and the SGD step in one C loop per tensor: weights and
    momentum buffers equal those of the rule's loop followed by the SGD loop, bit for bit, over
    eight steps (measured ones among them, an lr change, a parameter without a gradient)."""
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(16, 1, 8, 8, generator=gen, dtype=dtype),
         torch.randint(0, 10, (16,), generator=gen))
        for _ in range(8)
    ]  # fmt: skip
    runs, fused_steps = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = _MlpAndIdleParam(dtype)
        knob = {k: v for k, v in settings.items() if k not in ("maximize", "foreach")}
        opt = create_optimizer(model.named_parameters(), rho=0.2, stats_every=3,
                               **{**knob, **knobs})  # fmt: skip
        for group in opt.param_groups:  # what the factory does not take: set as torch reads it
            group.update({k: v for k, v in settings.items() if k not in knob})
        if not fused:
            opt._rule_and_step = lambda *args: False
        steps = 0
        for i, (x, y) in enumerate(batches):
            model.skip = i == 4
            if i == 6:
                opt.param_groups[0]["lr"] *= 0.5
            before = opt._steps
            with torch.no_grad():
                probe = opt._measuring()
            opt.train_step(model, LOSS, x, y)
            assert opt._steps == before + 1
            steps += not probe
        fused_steps.append(steps)
        state = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
        runs.append(([p.detach().clone() for p in model.parameters()], state))
    (w_f, s_f), (w_t, s_t) = runs
    assert fused_steps[0] >= 5  # most steps measured nothing: the one loop ran
    assert all(torch.equal(a, b) for a, b in zip(w_f, w_t, strict=True))
    for a, b in zip(s_f, s_t, strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_rule_and_sgd_in_one_loop_runs_where_it_applies(monkeypatch):
    """The one loop takes the step of a preset on CPU with torch's SGD on a step that measures
    nothing; a measured step, plain sam and another base optimizer keep the two steps."""
    calls: list[bool] = []
    real = native.sgd_step

    def spy(opt, rule=None, firsts=None):
        done = real(opt, rule, firsts)
        calls.append(rule is not None and done)
        return done

    monkeypatch.setattr(native, "sgd_step", spy)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def run(**knobs) -> list[bool]:
        calls.clear()
        model = create_model("mlp", num_classes=10, in_shape=(1, 8, 8), width=16)
        base = {"momentum": 0.9} if knobs.get("base", "sgd") == "sgd" else {}
        opt = create_optimizer(model.named_parameters(), lr=0.1, rho=0.1, **base, **knobs)
        for _ in range(2):  # the first step measures (the default statistics), the second not
            opt.train_step(model, LOSS, x, y)
        return list(calls)

    assert run(name="same", scales=[1, 0, 0, 0]) == [False, True]
    assert run(name="same", scales=[1, 0, 0, 0], stats=False) == [True, True]
    assert run(name="sam", stats=False) == [False, False]  # no rule: the SGD loop alone
    assert not any(run(name="same", scales=[1, 0, 0, 0], stats=False, base="adamw"))


def test_rule_and_sgd_loop_declines_a_g_it_cannot_read():
    """The step hands its g to ``sgd_step`` unchecked: a missing, transposed (not contiguous),
    float64 or misshapen g makes it decline (False) with the weights and state untouched."""
    p = torch.nn.Parameter(torch.randn(6, 4))
    p.grad = torch.randn(6, 4)
    rule = create_optimizer([p], name="same", scales=[1, 0, 0, 0], lr=0.1).rule.native_rule()
    assert rule is not None
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    before = p.detach().clone()
    for g in (None, torch.randn(4, 6).t(), torch.randn(6, 4, dtype=torch.float64),
              torch.randn(24)):  # fmt: skip
        firsts = {} if g is None else {id(p): g}
        assert not native.sgd_step(opt, rule, firsts)
        assert torch.equal(p, before) and not opt.state[p]
    assert native.sgd_step(opt, rule, {id(p): torch.randn(6, 4)})
    assert not torch.equal(p, before)
