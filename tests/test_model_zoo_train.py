"""End to end: train on a synthetic ImageFolder, export to ONNX, evaluate through ONNX Runtime.

The images are drawn with OpenCV (needle bundles, blob agglomerates, rings) so the
test does not depend on any data set; a few epochs are enough to check the
plumbing, not the accuracy.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_zoo import export as export_module
from model_zoo.cli import main
from model_zoo.registry import create_model
from monitor.manifest import (
    MANIFEST_FILE,
    EvaluationMetrics,
    ModelManifest,
    load_manifest,
    sha256_of_file,
)

TRAIN_ARGS = [
    "--arch",
    "mobilenet_v3_small",
    "--input-size",
    "64",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--seed",
    "3",
    "--threads",
    "2",
]
PER_CLASS = 40


def draw_particle(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A probe-like crop: CEX needle bundles (151 px), PG blobs and bubbles of varying size."""
    if kind == "CEX":
        height = width = 151
    else:
        height, width = (int(side) for side in rng.integers(70, 160, 2))
    image = np.full((height, width), float(rng.integers(150, 200)), np.float32)
    centre_x, centre_y = width / 2, height / 2
    ink = float(rng.integers(40, 90))
    if kind == "CEX":
        for _ in range(int(rng.integers(4, 9))):
            angle, length = rng.uniform(0, np.pi), rng.uniform(30, 70)
            dx, dy = np.cos(angle) * length, np.sin(angle) * length
            ox, oy = rng.normal(0, 6, 2)
            start = (int(centre_x + ox - dx), int(centre_y + oy - dy))
            end = (int(centre_x + ox + dx), int(centre_y + oy + dy))
            cv2.line(image, start, end, ink, 2, cv2.LINE_AA)
    elif kind == "PG":
        for _ in range(int(rng.integers(3, 7))):
            ox, oy = rng.normal(0, 10, 2)
            axes = (int(rng.integers(8, 20)), int(rng.integers(8, 20)))
            centre = (int(centre_x + ox), int(centre_y + oy))
            cv2.ellipse(image, centre, axes, rng.uniform(0, 180), 0, 360, ink, -1, cv2.LINE_AA)
    else:
        radius = int(rng.integers(15, 35))
        cv2.circle(image, (int(centre_x), int(centre_y)), radius, ink, 3, cv2.LINE_AA)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_class_folders(root: Path, counts: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind, count in counts.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            cv2.imwrite(str(root / kind / f"{kind}_{index:03d}.png"), draw_particle(kind, rng))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_class_folders(root, {"CEX": PER_CLASS, "PG": PER_CLASS}, seed=0)
    return root


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "cex-pg"
    assert main(["train", str(data_dir), "--out", str(run), *TRAIN_ARGS]) == 0
    return run


@pytest.fixture(scope="module")
def model_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plumbing model: two epochs on 80 crops is below the guardrails, hence --force."""
    model = tmp_path_factory.mktemp("models") / "cex-pg"
    exit_code = main(
        [
            "export",
            str(run_dir),
            "--out",
            str(model),
            "--name",
            "cex-pg-test",
            "--version",
            "0.1",
            "--force",
            "--no-ood",
        ]
    )
    assert exit_code == 0
    return model


@pytest.fixture(scope="module")
def imagenet_run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose features mean something: two epochs barely move mobilenet_v3_small
    from its random start (its embeddings then differ between images by about 1e-7, the
    size of float32 rounding, so no out-of-distribution score is possible), while an
    ImageNet-initialised Lite0 starts from features that tell images apart."""
    run = tmp_path_factory.mktemp("runs") / "lite0"
    arguments = ["--arch", "efficientnet_lite0", "--init", "imagenet", "--input-size", "64"]
    arguments += ["--epochs", "1", "--batch-size", "16", "--seed", "3", "--threads", "2"]
    assert main(["train", str(data_dir), "--out", str(run), *arguments]) == 0
    return run


def read_metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as stream:
        return list(csv.DictReader(stream))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and cv2.imread(str(path)) is not None


def test_training_writes_metrics_per_epoch(run_dir: Path) -> None:
    rows = read_metrics_rows(run_dir)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert list(rows[0]) == [
        "epoch",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "lr",
        "seconds",
        "train_images_per_s",
    ]
    for row in rows:
        assert 0 < float(row["train_loss"]) < 10
        assert 0 < float(row["val_loss"]) < 10
        assert 0 <= float(row["val_accuracy"]) <= 1
        assert 0 <= float(row["val_macro_f1"]) <= 1
        assert 0 < float(row["lr"]) <= 1e-3
        assert float(row["seconds"]) > 0
        assert float(row["train_images_per_s"]) > 0
    # Cosine schedule: the learning rate falls from epoch to epoch.
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])


def test_training_records_arguments_command_and_classes(run_dir: Path, data_dir: Path) -> None:
    args = json.loads((run_dir / "args.json").read_text())
    assert args["classes"] == ["CEX", "PG"]
    assert args["arch"] == "mobilenet_v3_small"
    assert args["input_size"] == 64
    assert args["epochs"] == 2
    assert args["uncertainty_threshold"] == 0.6
    assert args["balance"] == "loss-weights"
    assert args["layout"] == "class-folders"
    assert args["threads"] == 2
    assert args["data_dir"] == str(data_dir.resolve())
    assert args["input"]["size"] == 64
    assert args["input"]["resize"] == "letterbox"
    assert args["command"].startswith(f"python -m model_zoo train {data_dir} --out {run_dir}")
    assert args["command"].endswith("--threads 2")


def test_split_is_stratified_70_25_5_and_covers_every_file(run_dir: Path, data_dir: Path) -> None:
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["layout"] == "class-folders"
    assert splits["counts"] == {"train": [28, 28], "validation": [10, 10], "test": [2, 2]}
    listed = [row[0] for name in ("train", "validation", "test") for row in splits[name]]
    on_disk = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*.png"))
    assert sorted(listed) == on_disk
    assert all(row[0].startswith(row[1] + "/") for row in splits["train"])
    assert splits["unreadable"] == []


def test_best_checkpoint_loads_with_weights_only(run_dir: Path) -> None:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    model = create_model("mobilenet_v3_small", 2)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state)
    assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_evaluation_and_plots_describe_the_best_checkpoint(run_dir: Path) -> None:
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["classes"] == ["CEX", "PG"]
    assert evaluation["best_epoch"] in (1, 2)
    validation = EvaluationMetrics.model_validate(evaluation["validation"])
    test = EvaluationMetrics.model_validate(evaluation["test"])
    assert np.array(validation.confusion_matrix).sum(axis=1).tolist() == [10, 10]
    assert np.array(test.confusion_matrix).sum(axis=1).tolist() == [2, 2]
    for metrics in (validation, test):
        assert 0 <= metrics.accuracy <= 1
        assert 0 <= metrics.macro_f1 <= 1
    correct = np.trace(np.array(validation.confusion_matrix))
    assert validation.accuracy == pytest.approx(correct / 20)
    assert len(evaluation["misclassified"]["validation"]) == 20 - correct
    best_row = read_metrics_rows(run_dir)[evaluation["best_epoch"] - 1]
    assert float(best_row["val_macro_f1"]) == pytest.approx(validation.macro_f1, abs=1e-5)
    assert is_png(run_dir / "training_curves.png")
    assert is_png(run_dir / "confusion_matrix.png")


def test_export_writes_a_manifest_the_daemon_loads(run_dir: Path, model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == ["manifest.json", "model.onnx"]
    loaded = load_manifest(model_dir)
    manifest = loaded.manifest
    assert manifest == ModelManifest.model_validate_json((model_dir / MANIFEST_FILE).read_text())
    assert (manifest.name, manifest.version) == ("cex-pg-test", "0.1")
    assert manifest.architecture == "mobilenet_v3_small"
    assert manifest.classes == ("CEX", "PG")
    assert (manifest.input.size, manifest.input.resize) == (64, "letterbox")
    assert manifest.output == "probabilities" and manifest.ood is None
    assert manifest.uncertainty_threshold == 0.6
    assert manifest.opset >= 17
    assert manifest.onnx_sha256 == sha256_of_file(model_dir / "model.onnx")
    assert manifest.checkpoint_sha256 == sha256_of_file(run_dir / "checkpoint.pt")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert manifest.validation.model_dump() == evaluation["validation"]
    assert manifest.test is not None
    assert manifest.test.model_dump() == evaluation["test"]
    args = json.loads((run_dir / "args.json").read_text())
    assert manifest.training_command == args["command"]


def test_onnx_evaluation_reproduces_the_training_validation(
    run_dir: Path, model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Same images through manifest + prepare_batch + ONNX Runtime give torch's matrix."""
    splits = json.loads((run_dir / "splits.json").read_text())
    validation_dir = tmp_path / "validation"
    for relative, class_name in splits["validation"]:
        (validation_dir / class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / relative, validation_dir / class_name)
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["evaluate", str(model_dir), str(validation_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    (report,) = json.loads((out / "evaluation.json").read_text())["data_sets"]
    metrics = EvaluationMetrics.model_validate(report["metrics"])
    training = EvaluationMetrics.model_validate(
        json.loads((run_dir / "evaluation.json").read_text())["validation"]
    )
    assert metrics.confusion_matrix == training.confusion_matrix
    assert metrics.accuracy == pytest.approx(training.accuracy)
    assert report["images"] == 20
    assert len(report["misclassified"]) == 20 - np.trace(np.array(metrics.confusion_matrix))
    assert is_png(out / "confusion_matrix.png")
    summary = f"accuracy {metrics.accuracy:.4f}, macro-F1 {metrics.macro_f1:.4f} on 20 images"
    assert summary in printed
    assert f"misclassified ({len(report['misclassified'])})" in printed
    for item in report["misclassified"]:
        assert item["file"] in printed
    assert printed.splitlines()[0] == f"== {validation_dir} =="
    assert printed.splitlines()[1].split() == ["class", "precision", "recall", "f1", "support"]


def test_evaluate_on_a_subset_of_classes(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    only_pg = tmp_path / "only-pg"
    shutil.copytree(data_dir / "PG", only_pg / "PG")
    assert main(["evaluate", str(model_dir), str(only_pg)]) == 0
    printed = capsys.readouterr().out
    assert "pass --out DIR" in printed
    assert f"on {PER_CLASS} images" in printed
    assert not (only_pg / "evaluation.json").exists()


def test_evaluate_refuses_classes_the_model_does_not_know(
    model_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "three"
    shutil.copytree(data_dir / "PG", folder / "PG")
    write_class_folders(folder, {"bubble": 3}, seed=1)
    assert main(["evaluate", str(model_dir), str(folder)]) == 1
    error = capsys.readouterr().err
    assert "['bubble']" in error
    assert "['CEX', 'PG']" in error


def test_export_refuses_when_onnxruntime_disagrees_with_torch(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A graph that computes something else must never get a manifest."""
    real_write_onnx = export_module.write_onnx

    class SwappedClasses(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            rows = self.inner(images)
            return torch.cat((rows[:, 1:2], rows[:, 0:1], rows[:, 2:]), dim=1)

    def write_a_different_network(
        classifier: torch.nn.Module, *args: object, **kwargs: object
    ) -> int:
        return real_write_onnx(SwappedClasses(classifier).eval(), *args, **kwargs)

    monkeypatch.setattr(export_module, "write_onnx", write_a_different_network)
    out = tmp_path / "refused"
    assert main(["export", str(run_dir), "--out", str(out), "--force", "--no-ood"]) == 1
    assert "ONNX Runtime and torch disagree" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_training_is_reproducible_for_a_seed(data_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert main(["train", str(data_dir), "--out", str(again), *TRAIN_ARGS]) == 0
    first, second = read_metrics_rows(run_dir), read_metrics_rows(again)
    for column in ("train_loss", "val_loss", "val_macro_f1"):
        assert [row[column] for row in first] == [row[column] for row in second]
    assert (run_dir / "splits.json").read_text() == (again / "splits.json").read_text()
    state_1 = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state_2 = torch.load(again / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state_1[key], state_2[key]) for key in state_1)


def test_given_split_folders_and_initial_weights(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train/ and val/ are used as given (no test/), with a two-class checkpoint as start."""
    data = tmp_path / "splits"
    write_class_folders(data / "train", {"CEX": 10, "PG": 10, "bubble": 10}, seed=2)
    write_class_folders(data / "val", {"CEX": 4, "PG": 4, "bubble": 4}, seed=3)
    run = tmp_path / "run"
    exit_code = main(
        [
            "train",
            str(data),
            "--out",
            str(run),
            "--init-weights",
            str(run_dir / "checkpoint.pt"),
            "--balance",
            "weighted-sampler",
            "--resize",
            "stretch",
            *TRAIN_ARGS,
            "--epochs",
            "1",
        ]
    )
    assert exit_code == 0
    assert "classifier.3.weight (2, 1024) -> (3, 1024)" in capsys.readouterr().err
    splits = json.loads((run / "splits.json").read_text())
    assert splits["layout"] == "split-folders"
    assert splits["counts"] == {"train": [10, 10, 10], "validation": [4, 4, 4], "test": [0, 0, 0]}
    assert all(row[0].startswith("val/") for row in splits["validation"])
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["test"] is None
    assert np.array(evaluation["validation"]["confusion_matrix"]).shape == (3, 3)

    model = tmp_path / "model"
    assert main(["export", str(run), "--out", str(model), "--force", "--no-ood"]) == 0
    manifest = load_manifest(model).manifest
    assert manifest.classes == ("CEX", "PG", "bubble")
    assert manifest.input.resize == "stretch"
    assert manifest.test is None
    assert manifest.name == "run"


def test_training_refuses_to_overwrite_an_earlier_run(
    data_dir: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert main(["train", str(data_dir), "--out", str(run_dir), *TRAIN_ARGS]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_command_line_help_describes_each_command(capsys: pytest.CaptureFixture) -> None:
    def help_text(*args: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main([*args, "--help"])
        assert exited.value.code == 0
        return capsys.readouterr().out

    overview = help_text()
    assert all(command in overview for command in ("train", "export", "evaluate"))
    train_help = help_text("train")
    for option in ("--input-size", "--resize", "--patience", "--init-weights", "--balance"):
        assert option in train_help
    flat = " ".join(train_help.split())
    assert "training images per step (default: 64)" in flat
    assert "(default: 70,25,5)" in flat
    assert "(required; created if missing)" in flat
    assert "Default: imagenet for an architecture with local ImageNet weights, else scratch" in flat
    assert "held-out-site figure) (default: efficientnet_lite0)" in flat
    assert "(default: True)" not in flat and "(default: False)" not in flat
    assert "--opset" in help_text("export")
    assert "MODEL_DIR" in help_text("evaluate")


def test_python_dash_m_model_zoo_runs_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "model_zoo", "--help"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("usage: python -m model_zoo")


def _run_with_validation(run_dir: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of the run whose recorded validation metrics are replaced."""
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    evaluation = json.loads((copy / "evaluation.json").read_text())
    validation = evaluation["validation"]
    for key, value in changes.items():
        if key in ("CEX", "PG"):
            validation["per_class"][key]["recall"] = value
        else:
            validation[key] = value
    (copy / "evaluation.json").write_text(json.dumps(evaluation))
    return copy


def test_export_refuses_a_model_below_the_floors_and_says_why(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weak = _run_with_validation(run_dir, tmp_path, macro_f1=0.85, CEX=0.95, PG=0.7)
    out = tmp_path / "weak"
    assert main(["export", str(weak), "--out", str(out), "--no-ood"]) == 1
    error = capsys.readouterr().err
    assert "validation macro-F1 0.8500 is below the floor 0.90" in error
    assert "validation recall of PG 0.7000 is below the floor 0.80" in error
    assert "recall of CEX" not in error
    assert "--force" in error
    assert not out.exists() or list(out.iterdir()) == []

    # Forced, the model is written and says which floors it failed.
    assert main(["export", str(weak), "--out", str(out), "--force", "--no-ood"]) == 0
    guardrails = load_manifest(out).manifest.guardrails
    assert guardrails is not None and not guardrails.passed
    assert len(guardrails.problems) == 2


def test_export_passes_good_metrics_and_records_the_floors(run_dir: Path, tmp_path: Path) -> None:
    good = _run_with_validation(run_dir, tmp_path, macro_f1=0.97, CEX=0.96, PG=0.98)
    out = tmp_path / "good"
    command = ["export", str(good), "--out", str(out), "--min-class-recall", "0.9", "--no-ood"]
    assert main(command) == 0
    manifest = load_manifest(out).manifest
    assert manifest.guardrails is not None
    assert manifest.guardrails.model_dump() == {
        "min_macro_f1": 0.9,
        "min_class_recall": 0.9,
        "passed": True,
        "problems": [],
    }
    assert manifest.training_data is not None
    # The drawn test images carry no simulator ground truth: counted as real images.
    assert manifest.training_data.source == "real"
    assert manifest.training_data.counts == {
        "train": [28, 28],
        "validation": [10, 10],
        "test": [2, 2],
    }


def test_export_refuses_to_overwrite_a_model_without_overwrite(
    run_dir: Path, model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sha256_of_file(model_dir / "model.onnx")
    assert main(["export", str(run_dir), "--out", str(model_dir), "--force", "--no-ood"]) == 1
    assert "already holds a model" in capsys.readouterr().err
    assert sha256_of_file(model_dir / "model.onnx") == before
    assert (
        main(
            [
                "export",
                str(run_dir),
                "--out",
                str(model_dir),
                "--force",
                "--no-ood",
                "--overwrite",
                "--data-source",
                "simulated",
                "--name",
                "cex-pg-test",
                "--version",
                "0.1",
            ]
        )
        == 0
    )
    manifest = load_manifest(model_dir).manifest
    assert manifest.training_data is not None and manifest.training_data.source == "simulated"


def test_export_records_held_out_evaluations_and_the_score_matches_numpy(
    imagenet_run_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The in-graph score is the fitted layered Mahalanobis score, recomputed here in numpy,
    and `--evaluate NAME=DIR` stores that set's metrics in the manifest."""
    from model_zoo.imagefolder import list_labelled_files, load_images
    from model_zoo.ood import embed_images, fit_layers, scored_layers
    from monitor.imaging.preprocess import prepare_batch
    from monitor.inference.onnxruntime_backend import OnnxRuntimeBackend

    out = tmp_path / "evaluated"
    held_out = tmp_path / "held-out"
    write_class_folders(held_out, {"CEX": 6, "PG": 6}, seed=9)
    command = ["export", str(imagenet_run_dir), "--out", str(out), "--force"]
    assert main([*command, "--evaluate", f"site={held_out}"]) == 0
    loaded = load_manifest(out)
    assert loaded.manifest.recipe["init"] == "imagenet"
    assert loaded.manifest.recipe["arch"] == "efficientnet_lite0"
    assert len(loaded.manifest.recipe["init_weights_sha256"]) == 64
    assert set(loaded.manifest.evaluations) == {"site"}
    assert sum(map(sum, loaded.manifest.evaluations["site"].confusion_matrix)) == 12

    splits = json.loads((imagenet_run_dir / "splits.json").read_text())
    network = create_model("efficientnet_lite0", 2)
    network.load_state_dict(torch.load(imagenet_run_dir / "checkpoint.pt", weights_only=True))
    network.eval()
    files = list_labelled_files(data_dir, ("CEX", "PG"))
    train_names = {row[0] for row in splits["train"]}
    train = load_images(
        [f for f in files if f.path.relative_to(data_dir).as_posix() in train_names]
    )
    layers = scored_layers(network)
    assert loaded.manifest.ood is not None
    assert loaded.manifest.ood.layers == layers == ["_blocks.7", "_blocks.10"]
    validation = load_images(
        [f for f in files if f.path.relative_to(data_dir).as_posix() in {
            row[0] for row in splits["validation"]}]
    )  # fmt: skip
    spec = loaded.manifest.input
    fit = fit_layers(
        layers,
        embed_images(network, train.images, spec, layers=layers),
        train.labels,
        embed_images(network, validation.images, spec, layers=layers),
        2,
    )
    images = load_images(list_labelled_files(held_out, ("CEX", "PG"))).images
    expected = fit.score(embed_images(network, images, spec, layers=layers))
    backend = OnnxRuntimeBackend(loaded)
    rows = backend.infer(prepare_batch(images, loaded.manifest.input))
    backend.close()
    np.testing.assert_allclose(rows[:, 2], expected, rtol=0.01)
    np.testing.assert_allclose(rows[:, :2].sum(axis=1), 1.0, atol=1e-5)
