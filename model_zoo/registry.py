"""Registry of classifier architectures, keyed by the name stored in the manifest.

Every network is built untrained (`weights=None`): the plant box has no internet,
so initial weights only ever come from a local file (`--init-weights`).
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision.models as tvm
from torch import nn

ModelBuilder = Callable[[int], nn.Module]

_BUILDERS: dict[str, ModelBuilder] = {}

# torchvision's MobileNetV3 keeps batch-norm running statistics with momentum 0.01,
# tuned for long ImageNet schedules. A plant retraining on a few thousand crops runs
# only tens of steps per epoch, and the running statistics then lag the weights by
# several epochs, so evaluation (which uses them) sees a near-constant network. 0.1,
# the PyTorch default the other architectures use, follows within an epoch.
MOBILENET_BN_MOMENTUM = 0.1


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding `builder(num_classes) -> nn.Module` under `name`.

    A duplicate name raises: silently replacing an architecture would make an old
    manifest's `architecture` field mean a different network.
    """

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(
                f"model {name!r} is already registered (by {_BUILDERS[name].__qualname__}); "
                "pick a different name"
            )
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build architecture `name` with a classifier head of `num_classes` outputs."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(list_models())}"
        ) from None
    return builder(num_classes)


@register_model("resnet18")
def build_resnet18(num_classes: int) -> nn.Module:
    return tvm.resnet18(weights=None, num_classes=num_classes)


@register_model("resnet34")
def build_resnet34(num_classes: int) -> nn.Module:
    return tvm.resnet34(weights=None, num_classes=num_classes)


@register_model("resnet50")
def build_resnet50(num_classes: int) -> nn.Module:
    return tvm.resnet50(weights=None, num_classes=num_classes)


@register_model("resnet101")
def build_resnet101(num_classes: int) -> nn.Module:
    return tvm.resnet101(weights=None, num_classes=num_classes)


@register_model("mobilenet_v3_small")
def build_mobilenet_v3_small(num_classes: int) -> nn.Module:
    return _with_batchnorm_momentum(
        tvm.mobilenet_v3_small(weights=None, num_classes=num_classes), MOBILENET_BN_MOMENTUM
    )


@register_model("mobilenet_v3_large")
def build_mobilenet_v3_large(num_classes: int) -> nn.Module:
    return _with_batchnorm_momentum(
        tvm.mobilenet_v3_large(weights=None, num_classes=num_classes), MOBILENET_BN_MOMENTUM
    )


@register_model("efficientnet_b0")
def build_efficientnet_b0(num_classes: int) -> nn.Module:
    return tvm.efficientnet_b0(weights=None, num_classes=num_classes)


def _with_batchnorm_momentum(model: nn.Module, momentum: float) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model
