"""SAM / ASAM parity with a reference of the popular port, rho = 0, resume, refusals."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

from samstudy.optim import SAM, bn, create_optimizer


class PortSAM(torch.optim.Optimizer):
    """Reference: the popular one-file port, written from its published semantics."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        assert rho >= 0.0
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def port_disable_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.backup_momentum = m.momentum
            m.momentum = 0


def port_enable_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and hasattr(m, "backup_momentum"):
            m.momentum = m.backup_momentum


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen))
        for _ in range(n)
    ]


LOSS = nn.functional.cross_entropy
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def run_port(model, data, adaptive=False, rho=0.05):
    opt = PortSAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, **SGD_KW)
    for x, y in data:
        LOSS(model(x), y).backward()
        opt.first_step()
        port_disable_bn(model)
        LOSS(model(x), y).backward()
        port_enable_bn(model)
        opt.second_step()
    return model


def assert_same_model(a: nn.Module, b: nn.Module):
    """Same weights and running statistics; num_batches_tracked differs by design: the port's
    momentum = 0 trick still counts the second pass, samstudy's frozen statistics do not."""
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("adaptive", [False, True])
def test_dropin_matches_port_with_first_and_second_step(adaptive):
    data = batches(12)
    rho = 0.5 if adaptive else 0.05
    ref = run_port(make_model(), data, adaptive, rho)
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, **SGD_KW)
    for x, y in data:
        LOSS(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with bn.running_stats_frozen(model):
            LOSS(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert_same_model(model, ref)


def test_dropin_matches_port_with_closure():
    data = batches(12)
    ref = run_port(make_model(), data)
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
    for x, y in data:
        LOSS(model(x), y).backward()

        def closure(x=x, y=y):
            with bn.running_stats_frozen(model):
                loss = LOSS(model(x), y)
                loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    assert_same_model(model, ref)


def test_dropin_under_one_autocast_context_perturbs_the_second_pass():
    # bf16 autocast caches each weight's cast by the parameter; the port's usage with each
    # pass in a context of its own recasts, one context around both passes must too.
    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    data = batches(4)
    models = {}
    for shared in (False, True):
        model = models[shared] = make_model()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, **SGD_KW)
        for x, y in data:
            with bf16() if shared else contextlib.nullcontext():
                with contextlib.nullcontext() if shared else bf16():
                    LOSS(model(x).float(), y).backward()
                opt.first_step(zero_grad=True)
                with bn.running_stats_frozen(model):
                    with contextlib.nullcontext() if shared else bf16():
                        LOSS(model(x).float(), y).backward()
                opt.second_step(zero_grad=True)
    assert_same_model(models[True], models[False])


def test_dropin_second_step_leaves_no_perturbed_casts_behind():
    # After second_step (lr = 0: w unchanged) a forward in the same autocast context runs at w.
    x, y = batches(1)[0]
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        LOSS(model(x).float(), y).backward()
        opt.first_step(zero_grad=True)
        with bn.running_stats_frozen(model):
            LOSS(model(x).float(), y).backward()
        opt.second_step(zero_grad=True)
        model.eval()
        after = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x)
    assert torch.equal(after, fresh)


@pytest.mark.parametrize("ascent", ["sam", "adaptive"])
def test_train_step_matches_port(ascent):
    data = batches(12)
    rho = 0.5 if ascent == "adaptive" else 0.05
    ref = run_port(make_model(), data, ascent == "adaptive", rho)
    model = make_model()
    opt = create_optimizer(model.named_parameters(), name="sam", rho=rho, ascent=ascent, **SGD_KW)
    for x, y in data:
        loss, logits = opt.train_step(model, LOSS, x, y)
    assert_same_model(model, ref)
    assert model[1].num_batches_tracked.item() == len(data)  # first passes only


def test_train_step_returns_first_pass_values():
    model = make_model()
    x, y = batches(1)[0]
    probe = copy.deepcopy(model)
    want_logits = probe(x)
    want_loss = LOSS(want_logits, y)
    opt = create_optimizer(model.parameters(), name="custom_same", scales=[1, 0, -0.5, 1])
    loss, logits = opt.train_step(model, LOSS, x, y)
    assert not loss.requires_grad and not logits.requires_grad
    torch.testing.assert_close(logits, want_logits.detach())
    torch.testing.assert_close(loss, want_loss.detach())
    assert all(p.grad is None for p in model.parameters())
    # BatchNorm moved once (first pass only), like one SGD forward
    torch.testing.assert_close(model[1].running_mean, probe[1].running_mean)
    assert model[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize("base,kw", [("sgd", SGD_KW), ("adamw", dict(lr=1e-2, weight_decay=1e-2))])
def test_rho_zero_equals_the_base_optimizer(base, kw):
    data = batches(6)
    model = make_model()
    ref = make_model()
    opt = create_optimizer(model.parameters(), name="sam", base=base, rho=0.0, **kw)
    base_cls = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    ref_opt = base_cls(ref.parameters(), **kw)
    for x, y in data:
        opt.train_step(model, LOSS, x, y)
        ref_opt.zero_grad()
        LOSS(ref(x), y).backward()
        ref_opt.step()
    assert_same_model(model, ref)
    # the drop-in as well
    model2 = make_model()
    opt2 = SAM(model2.parameters(), base_cls, rho=0.0, **kw)
    for x, y in data:
        LOSS(model2(x), y).backward()
        opt2.first_step(zero_grad=True)
        with bn.running_stats_frozen(model2):
            LOSS(model2(x), y).backward()
        opt2.second_step(zero_grad=True)
    assert_same_model(model2, ref)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(name="sam", **SGD_KW),
        dict(name="saner", alpha=0.5, base="adamw", lr=1e-2),
        dict(name="sgd", **SGD_KW),
    ],
)
def test_resume_through_state_dict_is_exact(knobs):
    data = batches(8)
    straight = make_model()
    opt = create_optimizer(straight.parameters(), **knobs)
    for x, y in data:
        opt.train_step(straight, LOSS, x, y)

    first = make_model()
    opt1 = create_optimizer(first.parameters(), **knobs)
    for x, y in data[:4]:
        opt1.train_step(first, LOSS, x, y)
    ckpt = roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = create_optimizer(resumed.parameters(), **knobs)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[4:]:
        opt2.train_step(resumed, LOSS, x, y)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dropin_state_dict_carries_momentum():
    data = batches(6)

    def run(split):
        model = make_model()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
        for i, (x, y) in enumerate(data):
            if i == split:
                ckpt = roundtrip({"m": model.state_dict(), "o": opt.state_dict()})
                model = make_model(seed=9)
                model.load_state_dict(ckpt["m"])
                opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **SGD_KW)
                opt.load_state_dict(ckpt["o"])
            LOSS(model(x), y).backward()
            opt.first_step(zero_grad=True)
            LOSS(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return model

    a, b = run(split=-1), run(split=3)
    for ta, tb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb)


def test_refusals():
    model = make_model()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = batches(1)[0]
    LOSS(model(x), y).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    two = create_optimizer(model.parameters(), name="sam")
    with pytest.raises(RuntimeError, match="train_step"):
        two.step()


def test_lr_scheduler_drives_the_base_optimizer():
    model = make_model()
    opt = create_optimizer(model.parameters(), name="sam", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        opt.train_step(model, LOSS, x, y)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups
    # still shared after a reload
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups
