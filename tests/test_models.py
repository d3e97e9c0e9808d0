"""Model registry: shapes, published parameter counts, linear models' exact functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from samstudy.models import (
    available_models,
    create_model,
    model_kwargs,
    register_model,
    wide_resnet,
)

ALL = [
    "cnn",
    "linear",
    "linear2",
    "mlp",
    "resnet18",
    "resnet34",
    "resnet50",
    "wide_resnet",
    "wrn16_8",
    "wrn28_10",
    "wrn40_2",
]

# Published CIFAR-10 sizes: ResNet-18 "11.17M" (kuangliu port), WRN-28-10 "36.5M" and
# WRN-16-8 "11.0M" (Zagoruyko & Komodakis, Table 1), WRN-40-2 "2.2M"; ResNet-34/50 from the
# same CIFAR port.
PUBLISHED = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet50": 23_520_842,
    "wrn28_10": 36_479_194,
    "wrn16_8": 10_961_370,
    "wrn40_2": 2_243_546,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(name: str, num_classes: int = 10, **kwargs: object) -> int:
    """Parameters of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return n_params(create_model(name, num_classes, (3, 32, 32), **kwargs))


def test_registry_lists_every_model() -> None:
    assert available_models() == sorted(ALL)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name: str) -> None:
    assert count(name) == PUBLISHED[name]


def test_headline_counts_within_published_rounding() -> None:
    assert round(count("resnet18") / 1e6, 2) == 11.17
    assert round(count("wrn28_10") / 1e6, 1) == 36.5


def test_cifar100_head_only_changes_the_classifier() -> None:
    # 512 * 90 weights + 90 biases more than the 10-class model.
    diff = count("resnet18", 100) - PUBLISHED["resnet18"]
    assert diff == 512 * 90 + 90


def test_generic_wide_resnet_matches_named_ones() -> None:
    with torch.device("meta"):
        assert n_params(wide_resnet(28, 10)) == PUBLISHED["wrn28_10"]
    assert count("wide_resnet", depth=16, width=8) == PUBLISHED["wrn16_8"]
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet(27, 2)


def test_cifar_resnet_keeps_full_resolution_stem() -> None:
    model = create_model("resnet18", 10, (3, 32, 32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize(
    "name, side",
    [("resnet18", 32), ("resnet34", 16), ("resnet50", 16), ("wrn28_10", 16), ("wrn16_8", 16),
     ("wrn40_2", 32), ("wide_resnet", 16), ("cnn", 32), ("mlp", 32), ("linear", 32),
     ("linear2", 32)],
)  # fmt: skip
def test_output_shapes_on_images(name: str, side: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, 7, (3, side, side))
    out = model(torch.randn(3, 3, side, side))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "mlp", "linear", "linear2", "resnet18"])
def test_digit_sized_inputs(name: str) -> None:
    model = create_model(name, 10, (1, 8, 8))
    out = model(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_width_and_depth() -> None:
    model = create_model("mlp", 10, (1, 8, 8))
    assert n_params(model) == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    deep = create_model("mlp", 3, (20,), width=16, depth=4)
    linears = [m for m in deep.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 16, 16, 16, 3]
    assert deep(torch.randn(2, 20)).shape == (2, 3)


def test_cnn_architecture_is_two_conv_two_fc() -> None:
    model = create_model("cnn", 10, (1, 8, 8))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2
    small = create_model("cnn", 10, (3, 32, 32), channels=[8, 16], hidden=32)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_linear_is_bias_free_and_exact() -> None:
    model = create_model("linear", 4, (6,))
    assert n_params(model) == 24
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), x @ model.linear.weight.T)


def test_binary_logit_outputs_one_score_per_sample() -> None:
    lin = create_model("linear", 2, (6,), binary_logit=True)
    x = torch.randn(5, 6)
    out = lin(x)
    assert out.shape == (5,)
    torch.testing.assert_close(out, x @ lin.linear.weight[0])
    # Default: (B, num_classes) even for two classes.
    assert create_model("linear", 2, (6,))(x).shape == (5, 2)


def test_linear2_is_v_dot_wx() -> None:
    model = create_model("linear2", 2, (6,), hidden=3, binary_logit=True)
    assert n_params(model) == 6 * 3 + 3
    x = torch.randn(4, 6)
    w, v = model.W.weight, model.v.weight[0]
    torch.testing.assert_close(model(x), (x @ w.T) @ v)
    multi = create_model("linear2", 5, (6,), hidden=3)
    assert multi(x).shape == (4, 5)
    assert all(not isinstance(m, nn.ReLU) for m in multi.modules())


def test_init_scale_sets_weight_spread() -> None:
    torch.manual_seed(0)
    model = create_model("linear2", 2, (200,), hidden=100, init_scale=1e-3)
    assert model.W.weight.std().item() == pytest.approx(1e-3, rel=0.05)


def test_binary_logit_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="num_classes == 2"):
        create_model("linear", 3, (6,), binary_logit=True)


def test_unknown_model_and_kwargs_name_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="allowed: cnn, linear"):
        create_model("resnet19", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="accepted: width, depth"):
        create_model("mlp", 10, (3, 32, 32), widht=3)
    assert model_kwargs("linear2") == {"hidden": 64, "binary_logit": False, "init_scale": None}


def test_conv_models_need_image_shapes() -> None:
    with pytest.raises(ValueError, match="needs image inputs"):
        create_model("resnet18", 10, (64,))


def test_register_model_adds_a_name_once() -> None:
    @register_model("_test_tiny")
    def tiny(num_classes: int, in_shape: tuple[int, ...], scale: float = 1.0) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0], num_classes))

    try:
        assert "_test_tiny" in available_models()
        assert create_model("_test_tiny", 3, (4,), scale=2.0)(torch.randn(2, 4)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny")(tiny)
    finally:
        from samstudy.models import registry

        registry._REGISTRY.pop("_test_tiny")
