"""ImageFolder discovery, stratified splits and microscopy augmentations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from model_zoo.augment import AugmentConfig, augment_crop
from model_zoo.imagefolder import (
    DatasetError,
    LabelledFile,
    count_per_class,
    detect_layout,
    find_classes,
    load_images,
    reserved_folders,
    resolve_splits,
    split_stratified,
)


def write_images(folder: Path, count: int, *, size: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        cv2.imwrite(str(folder / f"{index:03d}.png"), np.full((size, size), index, np.uint8))


def test_stratified_split_is_70_25_5_per_class_and_seeded() -> None:
    files = [LabelledFile(Path(f"a{i}.png"), 0) for i in range(100)] + [
        LabelledFile(Path(f"b{i}.png"), 1) for i in range(40)
    ]
    train, validation, test = split_stratified(files, 2, (0.7, 0.25, 0.05), seed=7)
    assert count_per_class(train, 2) == [70, 28]
    assert count_per_class(validation, 2) == [25, 10]
    assert count_per_class(test, 2) == [5, 2]
    assert {f.path for f in train + validation + test} == {f.path for f in files}
    again = split_stratified(files, 2, (0.7, 0.25, 0.05), seed=7)
    assert again == (train, validation, test)
    other_seed = split_stratified(files, 2, (0.7, 0.25, 0.05), seed=8)
    assert other_seed[1] != validation


def test_tiny_class_keeps_a_training_and_a_validation_image() -> None:
    files = [LabelledFile(Path(f"a{i}"), 0) for i in range(2)] + [
        LabelledFile(Path(f"b{i}"), 1) for i in range(3)
    ]
    train, validation, test = split_stratified(files, 2, (0.7, 0.25, 0.05), seed=0)
    assert count_per_class(train, 2) == [1, 2]
    assert count_per_class(validation, 2) == [1, 1]
    assert test == []


def test_class_with_one_image_cannot_be_split() -> None:
    files = [LabelledFile(Path("a"), 0), LabelledFile(Path("b0"), 1), LabelledFile(Path("b1"), 1)]
    with pytest.raises(DatasetError, match="at least 2 per class"):
        split_stratified(files, 2, (0.7, 0.25, 0.05), seed=0)


def test_class_folders_are_found_sorted_and_labelled(tmp_path: Path) -> None:
    write_images(tmp_path / "PG", 8)
    write_images(tmp_path / "CEX", 12)
    (tmp_path / "CEX" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    assert detect_layout(tmp_path) == "class-folders"
    splits = resolve_splits(tmp_path, seed=0)
    assert splits.layout == "class-folders"
    assert splits.classes == ("CEX", "PG")
    everything = splits.train + splits.validation + splits.test
    assert len(everything) == 20
    assert all(f.path.parent.name == splits.classes[f.label] for f in everything)


def test_split_folders_are_detected_and_used_as_given(tmp_path: Path) -> None:
    for split, count in (("train", 6), ("val", 3)):
        write_images(tmp_path / split / "CEX", count)
        write_images(tmp_path / split / "PG", count)
    assert detect_layout(tmp_path) == "split-folders"
    splits = resolve_splits(tmp_path)
    assert splits.layout == "split-folders"
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (12, 6, 0)
    assert {f.path.parent.parent.name for f in splits.validation} == {"val"}


def test_validation_class_unknown_to_training_is_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "CEX", 3)
    write_images(tmp_path / "train" / "PG", 3)
    write_images(tmp_path / "val" / "bubble", 3)
    with pytest.raises(DatasetError, match=r"bubble.*not one of the known classes"):
        resolve_splits(tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: write_images(root / "CEX", 4), r"needs 2\+"),
        (lambda root: ((root / "CEX").mkdir(), write_images(root / "PG", 4)), "holds no images"),
        (lambda root: None, "no class folders"),
    ],
)
def test_unusable_folders_are_refused_with_the_fix(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    make(tmp_path)
    with pytest.raises(DatasetError, match=message):
        resolve_splits(tmp_path)


def test_images_are_decoded_once_to_grey_and_bad_files_set_aside(tmp_path: Path) -> None:
    write_images(tmp_path / "CEX", 3, size=24)
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[..., 2] = 255
    cv2.imwrite(str(tmp_path / "CEX" / "colour.png"), colour)
    deep = np.full((16, 16), 4095, np.uint16)
    cv2.imwrite(str(tmp_path / "CEX" / "deep.tif"), deep)
    (tmp_path / "CEX" / "broken.png").write_bytes(b"\x89PNG not really")
    files = [LabelledFile(p, 0) for p in sorted((tmp_path / "CEX").iterdir())]
    loaded = load_images(files, threads=2)
    assert [f.path.name for f in loaded.files] == [
        "000.png",
        "001.png",
        "002.png",
        "colour.png",
        "deep.tif",
    ]
    assert all(image.ndim == 2 and image.dtype == np.uint8 for image in loaded.images)
    assert loaded.images[3].shape == (30, 40)
    assert int(loaded.images[4].max()) == 255
    assert [path.name for path, _ in loaded.unreadable] == ["broken.png"]


def test_augmentation_keeps_shape_and_type_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (151, 120), dtype=np.uint8)
    first = augment_crop(crop, np.random.default_rng(5))
    again = augment_crop(crop, np.random.default_rng(5))
    other = augment_crop(crop, np.random.default_rng(6))
    assert first.shape == crop.shape
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_rotation_reflects_the_border_instead_of_padding_black() -> None:
    crop = np.full((100, 100), 180, np.uint8)
    config = AugmentConfig(
        rotation_degrees=45,
        scale_range=(0.8, 0.8),
        brightness_shift=0,
        contrast_range=(1, 1),
        blur_probability=0,
        noise_sigma_max=0,
    )
    for seed in range(5):
        out = augment_crop(crop, np.random.default_rng(seed), config)
        assert out.min() == 180
        assert out.max() == 180


def test_brightness_and_contrast_jitter_stay_within_their_bounds() -> None:
    crop = np.tile(np.linspace(50, 200, 64, dtype=np.float32), (64, 1)).astype(np.uint8)
    config = AugmentConfig(
        rotation_degrees=0,
        scale_range=(1, 1),
        shift_fraction=0,
        flip_probability=0,
        blur_probability=0,
        noise_sigma_max=0,
        brightness_shift=20,
        contrast_range=(0.8, 1.25),
    )
    means = [
        float(augment_crop(crop, np.random.default_rng(seed), config).mean()) for seed in range(50)
    ]
    assert abs(np.mean(means) - crop.mean()) < 6
    assert max(abs(m - crop.mean()) for m in means) <= 20.5
    assert np.std(means) > 3


def test_augmentation_rejects_colour_images() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        augment_crop(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))


def test_reserved_underscore_folders_of_a_samples_export_are_not_classes(
    tmp_path: Path,
) -> None:
    for folder in ("CEX", "PG", "_not_a_particle", "_unlabelled", ".cache"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), np.zeros((8, 8), np.uint8))
    assert find_classes(tmp_path) == ["CEX", "PG"]
    assert reserved_folders(tmp_path) == ["_not_a_particle", "_unlabelled"]
