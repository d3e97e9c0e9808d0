"""Model registry: CIFAR ResNets and WRNs, small CPU models, linear models for theory studies.

``create_model(name, num_classes, in_shape, **kwargs)`` builds any registered model;
``available_models()`` lists the names; ``@register_model("name")`` adds one.
"""

from . import resnet, small, wrn  # noqa: F401  (importing registers the builders)
from .registry import (
    available_models,
    classifier_path,
    create_model,
    layer_groups,
    model_kwargs,
    register_model,
    submodule,
)
from .resnet import ResNet
from .small import MLP, DeepLinear2, LinearModel, SmallCNN
from .wrn import WideResNet, wide_resnet

__all__ = [
    "MLP",
    "DeepLinear2",
    "LinearModel",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "available_models",
    "classifier_path",
    "create_model",
    "layer_groups",
    "model_kwargs",
    "register_model",
    "submodule",
    "wide_resnet",
]
