"""SimCLR pretraining, resuming, `train --init RUN` and the linear probe, on simulator crops.

Tiny on purpose: 128 unlabelled crops at 40 px, two epochs of mobilenet_v3_small on one
thread. The numbers asserted are the loss's own arithmetic, the resumed run's weights
and what the files say; the linear probe only has to beat chance on two classes the
classic simulator draws very differently (CEX needle bundles, PG agglomerates).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model_zoo import pretrain
from model_zoo.cli import main
from model_zoo.pretrain import list_unlabelled_files, nt_xent_loss, positive_top1
from model_zoo.registry import IMAGENET_MEAN, IMAGENET_STD, create_model
from model_zoo.simclr_views import SimCLRViewConfig, random_resized_crop, simclr_view
from monitor.simulator.crops import CropSimulator

ARCH = "mobilenet_v3_small"
HEAD_KEYS = {"classifier.3.weight", "classifier.3.bias"}
PRETRAIN_ARGS = ["--arch", ARCH, "--init", "scratch", "--input-size", "40", "--epochs", "2"]
PRETRAIN_ARGS += ["--batch-size", "32", "--seed", "4", "--threads", "1"]
TRAIN_ARGS = ["--arch", ARCH, "--input-size", "40", "--epochs", "1", "--batch-size", "16"]
TRAIN_ARGS += ["--threads", "1"]


def write_crops(folder: Path, label: str, count: int, simulator: CropSimulator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        cv2.imwrite(str(folder / f"{label}_{index:03d}.png"), simulator.render(label))


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """export/: an unlabelled folder shaped like a sample-store export (class folders and
    _not_a_particle, 128 images); labelled/: train/ and val/ of CEX and PG."""
    root = tmp_path_factory.mktemp("crops")
    simulator = CropSimulator(seed=5)
    for label in ("CEX", "PG"):
        write_crops(root / "export" / label, label, 60, simulator)
        write_crops(root / "labelled" / "train" / label, label, 40, simulator)
        write_crops(root / "labelled" / "val" / label, label, 20, simulator)
    rng = np.random.default_rng(0)
    not_a_particle = root / "export" / "_not_a_particle"
    not_a_particle.mkdir()
    for index in range(8):
        flat = rng.normal(120, 8, (150, 150)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(not_a_particle / f"empty_{index}.png"), flat)
    return root


@pytest.fixture(scope="module")
def run_dir(crops: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pretrain") / "simclr"
    assert main(["pretrain", str(crops / "export"), "--out", str(run), *PRETRAIN_ARGS]) == 0
    return run


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def test_nt_xent_of_identical_views_is_lower_than_of_random_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(16, 8, generator=generator)
    unrelated = torch.randn(16, 8, generator=generator)
    same = float(nt_xent_loss(first, first.clone(), 0.5))
    random_pairs = float(nt_xent_loss(first, unrelated, 0.5))
    assert same < random_pairs - 1.0
    # A random twin is no more similar than any of the 30 other views: about log(31).
    assert random_pairs == pytest.approx(math.log(31), abs=0.5)
    assert positive_top1(first, first.clone()) == 1.0


def test_nt_xent_matches_the_hand_computed_value_of_two_pairs() -> None:
    """Views a1=(3,4)/5, a2=(1,0); twins b1=(1,0), b2=(0,2)/2; temperature 0.5.

    Cosines: a1.a2 = 0.6, a1.b1 = 0.6, a1.b2 = 0.8, a2.b1 = 1, a2.b2 = 0, b1.b2 = 0.
    """
    t = 0.5
    e = math.exp
    per_view = [
        -math.log(e(0.6 / t) / (e(0.6 / t) + e(0.6 / t) + e(0.8 / t))),  # a1, twin b1
        -math.log(e(0.0 / t) / (e(0.6 / t) + e(1.0 / t) + e(0.0 / t))),  # a2, twin b2
        -math.log(e(0.6 / t) / (e(0.6 / t) + e(1.0 / t) + e(0.0 / t))),  # b1, twin a1
        -math.log(e(0.0 / t) / (e(0.8 / t) + e(0.0 / t) + e(0.0 / t))),  # b2, twin a2
    ]
    first = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    second = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(nt_xent_loss(first, second, t)) == pytest.approx(sum(per_view) / 4, rel=1e-6)


def test_views_are_seeded_crops_of_the_asked_area_and_differ_from_each_other() -> None:
    grey = CropSimulator(seed=1).render("CEX")
    rng = np.random.default_rng(3)
    for _ in range(20):
        region = random_resized_crop(grey, rng, (0.25, 1.0), (3 / 4, 4 / 3))
        assert 0.2 <= region.size / grey.size <= 1.0
    first = simclr_view(grey, np.random.default_rng(7))
    again = simclr_view(grey, np.random.default_rng(7))
    other = simclr_view(grey, np.random.default_rng(8))
    assert first.dtype == np.uint8 and first.ndim == 2
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)
    assert SimCLRViewConfig().jitter_probability == 0.8


def test_unlabelled_folder_is_searched_recursively_in_every_format_without_hidden_files(
    tmp_path: Path,
) -> None:
    grey = CropSimulator(seed=2).render("PG")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    cv2.imwrite(str(tmp_path / "top.png"), grey)
    cv2.imwrite(str(tmp_path / "a" / "crop.jpg"), grey)
    cv2.imwrite(str(tmp_path / "a" / "b" / "deep16.tif"), grey.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "a" / "b" / "crop.bmp"), grey)
    cv2.imwrite(str(tmp_path / ".hidden" / "skip.png"), grey)
    (tmp_path / "notes.txt").write_text("not an image")
    found = [item.path.relative_to(tmp_path).as_posix() for item in list_unlabelled_files(tmp_path)]
    assert found == ["a/b/crop.bmp", "a/b/deep16.tif", "a/crop.jpg", "top.png"]


def test_pretrain_writes_encoder_args_and_a_loss_per_epoch(run_dir: Path, crops: Path) -> None:
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "args.json",
        "checkpoint.pt",
        "encoder.pt",
        "metrics.csv",
    ]
    args = json.loads((run_dir / "args.json").read_text())
    assert (args["kind"], args["method"], args["arch"]) == ("pretrain", "simclr", ARCH)
    assert (args["temperature"], args["images"], args["init"]) == (0.5, 128, "scratch")
    assert args["data_dir"] == str((crops / "export").resolve())
    assert args["input"] == {
        "size": 40,
        "channels": 3,
        "resize": "letterbox",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    rows = read_rows(run_dir / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    for row in rows:
        # 64 views a batch: a loss near log(63) = 4.14 means no better than chance.
        assert 2.0 < float(row["loss"]) < 4.3
        assert 0.0 <= float(row["positive_top1"]) <= 1.0
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) <= 1e-3
    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)
    assert set(encoder) == set(create_model(ARCH, 2).state_dict()) - HEAD_KEYS
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert any(key.startswith("projection.") for key in state["model"])


def test_an_interrupted_pretrain_resumes_after_its_last_epoch_and_ends_where_one_run_does(
    run_dir: Path,
    crops: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A crash after epoch 1's checkpoint; the same command again trains epoch 2 only,
    from the saved weights, optimiser, schedule and random state, so the encoder equals
    the uninterrupted run's."""
    save_state = pretrain._save_state

    def crash_after_first_epoch(path: Path, *args: object, **kwargs: object) -> None:
        save_state(path, *args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt("simulated power cut after epoch 1")

    run = tmp_path / "interrupted"
    command = ["pretrain", str(crops / "export"), "--out", str(run), *PRETRAIN_ARGS]
    monkeypatch.setattr(pretrain, "_save_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(command)
    assert not (run / "encoder.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(pretrain, "_save_state", save_state)
    capsys.readouterr()

    assert main([*command, "--resume"]) == 0
    error = capsys.readouterr().err
    assert f"resuming {run} after epoch 1 of 2" in error
    assert "epoch 1:" not in error and "epoch 2:" in error
    assert [row["epoch"] for row in read_rows(run / "metrics.csv")] == ["1", "2"]
    resumed = torch.load(run / "encoder.pt", weights_only=True)
    uninterrupted = torch.load(run_dir / "encoder.pt", weights_only=True)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert json.loads((run / "args.json").read_text())["resumed"][0]["after_epoch"] == 1


def test_a_run_directory_is_not_resumed_with_other_arguments_or_when_finished(
    run_dir: Path, crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["pretrain", str(crops / "export"), "--out", str(run_dir), *PRETRAIN_ARGS]
    assert main([*command, "--temperature", "0.1"]) == 1
    error = capsys.readouterr().err
    assert "temperature 0.5 -> 0.1" in error and "--overwrite" in error
    assert main(command) == 1
    error = capsys.readouterr().err
    assert "finished pretrain run (2 epochs" in error and f"--init {run_dir}" in error
    empty = tmp_path / "empty"
    assert main(["pretrain", str(crops / "export"), "--out", str(empty), "--resume"]) == 1
    assert "holds no pretrain run to resume" in capsys.readouterr().err


def test_the_encoder_fine_tunes_with_train_init_run_skipping_only_the_head(
    run_dir: Path, crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "fine-tuned"
    arguments = ["train", str(crops / "labelled"), "--out", str(run), *TRAIN_ARGS]
    assert main([*arguments, "--init", str(run_dir)]) == 0
    error = capsys.readouterr().err
    assert "initial weights: loaded 242 tensors" in error
    assert "2 not in the file: classifier.3.weight, classifier.3.bias" in error
    assert "different shape" not in error and "not in the model" not in error
    args = json.loads((run / "args.json").read_text())
    assert args["init"] == str(run_dir.resolve())
    assert args["init_weights"] == str((run_dir / "encoder.pt").resolve())
    assert (args["init_run"]["kind"], args["init_run"]["method"]) == ("pretrain", "simclr")
    recorded = json.loads((run_dir / "args.json").read_text())["input"]
    assert (args["input"]["mean"], args["input"]["std"]) == (recorded["mean"], recorded["std"])


def test_train_init_refuses_a_pretrain_run_of_another_arch_naming_the_fix(
    run_dir: Path, crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "wrong-arch"
    arguments = ["train", str(crops / "labelled"), "--out", str(run), "--arch", "resnet18"]
    assert main([*arguments, "--init", str(run_dir)]) == 1
    error = capsys.readouterr().err
    assert f"pretrained as --arch {ARCH}" in error and f"pass --arch {ARCH}" in error
    assert not run.exists()


def test_train_takes_the_input_normalisation_the_pretrain_run_recorded(
    run_dir: Path, crops: Path, tmp_path: Path
) -> None:
    pretrained = tmp_path / "lite-normalised"
    shutil.copytree(run_dir, pretrained)
    args = json.loads((pretrained / "args.json").read_text())
    args["input"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    (pretrained / "args.json").write_text(json.dumps(args))
    run = tmp_path / "fine-tuned"
    data = tmp_path / "few"
    for split, count in (("train", 6), ("val", 3)):
        for label in ("CEX", "PG"):
            (data / split / label).mkdir(parents=True)
            for source in sorted((crops / "labelled" / split / label).iterdir())[:count]:
                shutil.copy(source, data / split / label)
    command = ["train", str(data), "--out", str(run), *TRAIN_ARGS, "--init"]
    assert main([*command, str(pretrained / "encoder.pt")]) == 0
    recorded = json.loads((run / "args.json").read_text())["input"]
    assert (recorded["mean"], recorded["std"]) == ([0.5] * 3, [0.25] * 3)


def test_linear_probe_separates_needle_bundles_from_agglomerates_above_chance(
    run_dir: Path, crops: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe"
    command = ["evaluate", "--linear-probe", str(run_dir), str(crops / "labelled")]
    assert main([*command, "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "linear_probe.json").read_text())
    assert (report["arch"], report["origin"], report["feature_dim"]) == (ARCH, "pretrain run", 1024)
    assert report["train_images"] == 80
    validation = report["validation"]
    assert sum(map(sum, validation["confusion_matrix"])) == 40
    assert validation["accuracy"] >= 0.75, validation
    assert min(item["recall"] for item in validation["per_class"].values()) >= 0.5
    assert f"accuracy {validation['accuracy']:.4f}" in printed
    assert "recall per class: CEX" in printed
