"""Per-epoch norms (Proposition 4.1): weight norms per layer group and the mean norm of the
classifier's input on a fixed batch, measured on the device without changing the trajectory."""

from __future__ import annotations

import math

import pytest
import torch

from samstudy.models import available_models, classifier_path, create_model, layer_groups
from samstudy.train.norms import NormProbe


def test_models_declare_their_classifier() -> None:
    for name in ("linear2", "resnet18", "resnet34", "resnet50", "wrn28_10", "cnn", "mlp"):
        assert classifier_path(name) is not None, name
    assert classifier_path("linear") is None  # no intermediate features
    assert set(available_models()) >= {"linear2", "resnet18"}


@pytest.mark.parametrize(
    ("name", "shape", "groups"),
    [
        ("linear2", (32,), ["W", "v"]),
        ("mlp", (1, 8, 8), ["net.1", "net.3", "net.5"]),
        ("cnn", (1, 8, 8), ["features.0", "features.3", "classifier.1", "classifier.3"]),
        ("resnet18", (3, 32, 32), ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]),
    ],
)
def test_weight_norms_per_group(name: str, shape: tuple[int, ...], groups: list[str]) -> None:
    torch.manual_seed(0)
    model = create_model(name, 10 if name != "linear2" else 2, shape)
    assert list(layer_groups(model)) == groups
    probe = NormProbe(model, name, torch.randn(4, *shape))
    values = dict(zip(probe.names, probe.measure().tolist(), strict=True))
    for group in groups:
        flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                          if n == group or n.startswith(group + ".")])  # fmt: skip
        assert values[f"weight_norm.{group}"] == pytest.approx(
            float(flat.double().norm()), rel=1e-5
        )
    every = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values["weight_norm"] == pytest.approx(float(every.double().norm()), rel=1e-5)


def test_activation_and_last_layer_norms_of_linear2() -> None:
    torch.manual_seed(0)
    model = create_model("linear2", 2, (32,), hidden=8, binary_logit=True)
    x = torch.randn(16, 32)
    probe = NormProbe(model, "linear2", x)
    values = dict(zip(probe.names, probe.measure().tolist(), strict=True))
    z = x @ model.W.weight.detach().T  # the intermediate activation W x
    assert values["activation_norm"] == pytest.approx(float(z.norm(dim=1).mean()), rel=1e-6)
    assert values["last_layer_norm"] == pytest.approx(
        float(model.v.weight.detach().norm()), rel=1e-6
    )
    # the linear model has no features: weight norms only
    linear = NormProbe(create_model("linear", 2, (32,)), "linear", x)
    assert "activation_norm" not in linear.names and "last_layer_norm" not in linear.names


def test_measuring_leaves_the_model_and_the_random_state_alone() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 10, (3, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = torch.randn(8, 3, 8, 8) * 3
    rng = torch.get_rng_state()
    probe = NormProbe(model, "resnet18", batch)
    norm = dict(zip(probe.names, probe.measure().tolist(), strict=True))["activation_norm"]
    assert math.isfinite(norm) and norm > 0
    assert model.training  # back in train mode
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():  # BatchNorm's running stats untouched
        assert torch.equal(value, before[key]), key


def test_a_trial_logs_the_norms_every_epoch() -> None:
    from samstudy.train import run_trial

    seen: list[dict] = []
    config = {
        "data": {"name": "gaussian"},
        "model": {"name": "linear2", "kwargs": {"binary_logit": True, "hidden": 8}},
        "optimizer": {"name": "sam", "second_grad": "jacobian", "rho": 0.05},
        "epochs": 2,
        "device": "cpu",
        "threads": 1,
        "checkpoint_every": 0,
    }
    run_trial(config, lambda metrics, _checkpoint: seen.append(metrics))
    for metrics in seen:
        for key in ("weight_norm", "weight_norm.W", "weight_norm.v", "last_layer_norm",
                    "activation_norm"):  # fmt: skip
            assert math.isfinite(metrics[key]) and metrics[key] > 0, key
        assert metrics["last_layer_norm"] == metrics["weight_norm.v"]
    assert seen[0]["weight_norm.W"] != seen[1]["weight_norm.W"]  # measured after each epoch
