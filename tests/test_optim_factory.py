"""create_optimizer / check_optimizer_config: every preset builds, every bad knob is named."""

from __future__ import annotations

import pytest
import torch

from samstudy.optim import PRESETS, SamOptimizer, check_optimizer_config, create_optimizer


def params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_every_preset_builds_on_every_base(name, base):
    knobs = PRESETS[name].example  # every registered preset, with its own example knobs
    check_optimizer_config({"name": name, "base": base, **knobs})
    opt = create_optimizer(params(), name=name, base=base, lr=0.1, **knobs)
    assert isinstance(opt, SamOptimizer)
    assert opt.two_step == (name != "sgd")
    assert isinstance(opt.base_optimizer, torch.optim.SGD if base == "sgd" else torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.1


def test_full_mapping_with_all_knobs_is_valid():
    check_optimizer_config(
        {
            "name": "custom_same",
            "base": "sgd",
            "lr": 0.05,
            "rho": 0.1,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "nesterov": True,
            "scales": [1.0, 0.0, -1.0, 2.0],
            "ascent": "clamp",
            "clamp_quantile": 0.99,
            "clamp_renorm": True,
            "m": 16,
            "second_grad": "jacobian",
            "stats": True,
            "stats_every": 10,
            "compile": False,
        }
    )
    check_optimizer_config({"name": "sam", "base": "adamw", "betas": [0.9, 0.99], "eps": 1e-6})
    check_optimizer_config({"ascent": "adaptive", "eta": 0.01})
    check_optimizer_config({})  # the defaults: sam, sgd
    check_optimizer_config({"name": "sgd", "rho": 0.05})  # rho is accepted and ignored


def test_base_knobs_reach_the_base_optimizer():
    opt = create_optimizer(params(), name="sam", momentum=0.8, weight_decay=0.01, nesterov=True)
    group = opt.base_optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 0.01, True)
    opt = create_optimizer(params(), base="adamw", betas=[0.8, 0.9], eps=1e-5)
    assert opt.base_optimizer.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize(
    "mapping,words",
    [
        ({"name": "samm"}, ["optimizer.name", "samm", "custom_same", "sgd_on_region"]),
        ({"base": "adam"}, ["optimizer.base", "adam", "sgd, adamw"]),
        ({"lr": -1}, ["optimizer.lr", ">= 0"]),
        ({"rho": -0.1}, ["optimizer.rho", ">= 0"]),
        ({"rho": "0.1"}, ["optimizer.rho"]),
        ({"foo": 1}, ["unknown knob 'foo'", "momentum"]),
        ({"betas": [0.9, 0.99]}, ["optimizer.betas", "base 'sgd'", "momentum"]),
        ({"base": "adamw", "momentum": 0.9}, ["optimizer.momentum", "betas"]),
        ({"name": "same"}, ["optimizer.scales", "4 numbers"]),
        ({"name": "same", "scales": [1, 0, 0]}, ["optimizer.scales", "4 numbers"]),
        ({"name": "same", "scales": [1, 0, 0, "x"]}, ["optimizer.scales"]),
        ({"name": "custom_same", "scales": [1, 0.1, -0.5, 1]}, ["optimizer.scales", "s2 = 0"]),
        ({"name": "custom_same", "scales": [1, 0, -1.5, 1]}, ["optimizer.scales", "-1 <= s3 < 0"]),
        ({"name": "custom_same", "scales": [-1, 0, -0.5, 1]}, ["optimizer.scales", "s1 > 0"]),
        ({"name": "custom_same", "scales": [1, 0, -0.5, 0]}, ["optimizer.scales", "s4 > 0"]),
        ({"name": "sam", "scales": [1, 0, 0, 0]}, ["optimizer.scales", "same, custom_same"]),
        ({"name": "saner"}, ["optimizer.alpha"]),
        ({"name": "sam", "alpha": 0.5}, ["optimizer.alpha", "saner"]),
        ({"name": "sgd_on_region"}, ["optimizer.region", "1, 2, 3 or 4"]),
        ({"name": "sgd_on_region", "region": 5}, ["optimizer.region", "<= 4", "1, 2, 3 or 4"]),
        ({"name": "sgd_on_region", "region": 0}, ["optimizer.region", ">= 1", "1, 2, 3 or 4"]),
        ({"name": "sgd_on_region", "region": True}, ["optimizer.region"]),
        ({"name": "table"}, ["optimizer.coefficients", "4 rows"]),
        ({"name": "table", "coefficients": [[1, 0]] * 3}, ["optimizer.coefficients", "4 rows"]),
        ({"name": "table", "coefficients": [[1, 0, 2]] * 4}, ["optimizer.coefficients"]),
        ({"ascent": "asam"}, ["optimizer.ascent", "sam, adaptive, clamp"]),
        ({"second_grad": "jsam"}, ["optimizer.second_grad", "full, jacobian, logit"]),
        ({"eta": 0.01}, ["optimizer.eta", "adaptive"]),
        ({"clamp_rms": 2.0}, ["optimizer.clamp_rms", "clamp"]),
        (
            {"ascent": "clamp", "clamp_rms": 2.0, "clamp_quantile": 0.9},
            ["optimizer.clamp_rms", "not both"],
        ),
        ({"ascent": "clamp", "clamp_quantile": 1.5}, ["optimizer.clamp_quantile", "(0, 1]"]),
        ({"m": 0}, ["optimizer.m", ">= 1"]),
        ({"m": 2.5}, ["optimizer.m"]),
        ({"name": "sgd", "m": 4}, ["optimizer.m", "sgd"]),
        ({"name": "sgd", "ascent": "adaptive"}, ["optimizer.ascent", "sgd"]),
        ({"stats": "yes"}, ["optimizer.stats", "true or false"]),
        ({"stats_every": 0}, ["optimizer.stats_every", ">= 1"]),
        ({"compile": 1}, ["optimizer.compile", "true, false, 'auto'"]),
        ({"compile": "yes"}, ["optimizer.compile", "true, false, 'auto'"]),
        ({"nesterov": True}, ["optimizer.nesterov", "momentum > 0"]),
        ({"base": "adamw", "betas": [0.9, 1.0]}, ["optimizer.betas", "[0, 1)"]),
        ({"base": "adamw", "eps": 0}, ["optimizer.eps", "> 0"]),
    ],
)
def test_bad_configs_name_the_knob_and_the_allowed_values(mapping, words):
    with pytest.raises(ValueError) as err:
        check_optimizer_config(mapping)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    # create_optimizer refuses the same way
    kwargs = dict(mapping)
    with pytest.raises(ValueError):
        create_optimizer(params(), **kwargs)


def test_not_a_mapping():
    with pytest.raises(ValueError, match="optimizer"):
        check_optimizer_config(["sam"])  # type: ignore[arg-type]


def test_params_as_groups_and_named_pairs():
    a, b = params()
    opt = create_optimizer([{"params": [a], "rho": 0.1}, {"params": [b], "lr": 0.5}], lr=0.1)
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[1]["lr"] == 0.5
    assert opt.param_groups[1]["rho"] == 0.05
    opt = create_optimizer([("first", a), ("second", b)])
    assert opt._given_names == {id(a): "first", id(b): "second"}
    with pytest.raises(ValueError, match="empty"):
        create_optimizer([])


def test_the_config_forms_of_create_optimizer_agree():
    from samstudy.optim import parse_optimizer_config

    knobs = {"name": "saner", "alpha": 0.5, "lr": 0.1, "momentum": 0.9}
    built = [
        create_optimizer(params(), **knobs),
        create_optimizer(params(), knobs),
        create_optimizer(params(), parse_optimizer_config(knobs)),
        create_optimizer(params(), "saner", alpha=0.5, lr=0.1, momentum=0.9),  # name positional
    ]
    for opt in built:
        assert opt.name == "saner" and opt.rule.table == built[0].rule.table
        assert opt.base_optimizer.defaults["momentum"] == 0.9
    with pytest.raises(TypeError, match="not both"):
        create_optimizer(params(), knobs, lr=0.2)
