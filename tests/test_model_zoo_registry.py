"""Every registered architecture builds, runs, exports to ONNX and matches ONNX Runtime.

Generated from the registry, so a newly registered model is covered without
touching this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from model_zoo import export as export_module
from model_zoo.checkpoint import CheckpointError, load_initial_weights, load_state_dict
from model_zoo.export import (
    PARITY_TOLERANCE,
    ExportError,
    SoftmaxClassifier,
    read_opset,
    write_onnx,
)
from model_zoo.registry import create_model, list_models, register_model

REQUIRED = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
}
INPUT_SIZE = 64


def test_registry_lists_the_required_architectures_sorted() -> None:
    names = list_models()
    assert set(names) >= REQUIRED
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_models())
def test_architecture_builds_runs_exports_and_matches_onnxruntime(
    name: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    classifier = SoftmaxClassifier(create_model(name, num_classes=3)).eval()
    with torch.no_grad():
        probabilities = classifier(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE))
    assert probabilities.shape == (2, 3)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2), atol=1e-5)

    onnx_path = tmp_path / "model.onnx"
    opset = write_onnx(classifier, onnx_path, INPUT_SIZE, opset=17)
    assert opset >= 17
    assert not list(tmp_path.glob("*.data")), "the export must be one self-contained file"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (output,) = session.get_outputs()
    assert output.name == "probabilities"
    for batch_size in (1, 7):
        inputs = torch.randn(batch_size, 3, INPUT_SIZE, INPUT_SIZE) * 0.5
        with torch.no_grad():
            expected = classifier(inputs).numpy()
        (actual,) = session.run(None, {"input": inputs.numpy()})
        assert actual.shape == (batch_size, 3)
        np.testing.assert_allclose(actual, expected, atol=PARITY_TOLERANCE, rtol=0)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_head_has_one_output_per_class(num_classes: int) -> None:
    model = create_model("resnet18", num_classes).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_model("resnet18")
        def build_other(num_classes: int) -> nn.Module:
            return nn.Linear(1, num_classes)

    assert create_model("resnet18", 2).fc.out_features == 2


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg11'.*mobilenet_v3_small"):
        create_model("vgg11", 2)


def test_single_class_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_model("resnet18", 1)


def test_mobilenet_batchnorm_follows_the_data_within_an_epoch() -> None:
    model = create_model("mobilenet_v3_small", 2)
    momenta = {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_initial_weights_skip_a_head_of_another_size(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model("mobilenet_v3_small", 5)
    path = tmp_path / "imagenet-like.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)

    torch.manual_seed(2)
    target = create_model("mobilenet_v3_small", 2)
    head_before = target.classifier[3].weight.detach().clone()
    report = load_initial_weights(target, path)

    assert [entry.split()[0] for entry in report.shape_mismatch] == [
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    assert report.missing == []
    assert report.unexpected == []
    assert "classifier.3.weight (5, 1024) -> (2, 1024)" in report.describe()
    assert torch.equal(target.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(target.classifier[3].weight, head_before)


def test_initial_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(create_model("resnet18", 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="different --arch"):
        load_initial_weights(create_model("mobilenet_v3_small", 2), path)


def test_pickled_objects_are_not_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(create_model("resnet18", 2), path)  # a whole module, not a state_dict
    with pytest.raises(CheckpointError, match="state_dict"):
        load_state_dict(path)


def test_dynamo_exporter_takes_over_when_the_torchscript_exporter_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = torch.onnx.export

    def torchscript_gone(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo") is False:
            raise RuntimeError("legacy exporter removed")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_module.torch.onnx, "export", torchscript_gone)
    torch.manual_seed(0)
    tiny = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    classifier = SoftmaxClassifier(tiny).eval()
    path = tmp_path / "model.onnx"
    opset = write_onnx(classifier, path, 32, opset=17)
    assert opset >= 18
    assert read_opset(path) == opset
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):
        inputs = torch.randn(batch_size, 3, 32, 32)
        with torch.no_grad():
            expected = classifier(inputs).numpy()
        (actual,) = session.run(None, {"input": inputs.numpy()})
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_export_fails_with_both_reasons_when_no_exporter_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("dynamo" if kwargs.get("dynamo") else "torchscript")

    monkeypatch.setattr(export_module.torch.onnx, "export", broken)
    classifier = SoftmaxClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)))
    with pytest.raises(ExportError, match="TorchScript: torchscript; dynamo: dynamo"):
        write_onnx(classifier.eval(), tmp_path / "model.onnx", 8, opset=17)
