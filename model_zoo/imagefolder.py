"""ImageFolder data sets: find labelled files, split them, decode them once into memory.

Layouts:

* class folders: `DATA_DIR/<class>/**/<image>`; split here, stratified and seeded.
* split folders: `DATA_DIR/train`, `DATA_DIR/val` and optionally `DATA_DIR/test`,
  each a class-folder layout; used as given.

Crops are small and decoding dominates a naive epoch on two cores, so each image
is decoded once (by `monitor.imaging.decode`, like the daemon does) and kept as a 2-D uint8
array.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from model_zoo.errors import ModelZooError
from monitor.imaging.decode import IMAGE_SUFFIXES, DecodeError, read_image_file

Layout = Literal["class-folders", "split-folders"]
SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
DEFAULT_FRACTIONS = (0.70, 0.25, 0.05)


class DatasetError(ModelZooError):
    """A data folder that cannot be used for training or evaluation."""


@dataclass(frozen=True)
class LabelledFile:
    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplits:
    """Labelled files of the train, validation and test splits, with the class order."""

    layout: Layout
    classes: tuple[str, ...]
    train: list[LabelledFile]
    validation: list[LabelledFile]
    test: list[LabelledFile]

    def to_json(self, data_dir: Path) -> dict[str, object]:
        """The split file lists, paths relative to `data_dir`, for `splits.json`."""

        def rows(files: list[LabelledFile]) -> list[list[str]]:
            return [[_relative(f.path, data_dir), self.classes[f.label]] for f in files]

        return {
            "data_dir": str(data_dir.resolve()),
            "layout": self.layout,
            "classes": list(self.classes),
            "counts": {
                name: count_per_class(files, len(self.classes))
                for name, files in self.named_splits()
            },
            "train": rows(self.train),
            "validation": rows(self.validation),
            "test": rows(self.test),
        }

    def named_splits(self) -> list[tuple[str, list[LabelledFile]]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]


@dataclass
class LoadedImages:
    """Decoded images of one split, in the order of `files`."""

    files: list[LabelledFile]
    images: list[np.ndarray]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([f.label for f in self.files], dtype=np.int64)


RESERVED_PREFIX = "_"
"""Folders named `_...` are not classes: the daemon's `samples export` writes crops an
operator called "not a particle" to `_not_a_particle/` and unlabelled ones to
`_unlabelled/`, beside the class folders, so its export trains as it is."""


def reserved_folders(folder: Path) -> list[str]:
    """The `_...` sub-folders `find_classes` leaves out, for the run's log."""
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and entry.name.startswith(RESERVED_PREFIX)
    )


def find_classes(folder: Path) -> list[str]:
    """Class names = sub-folder names, sorted (torchvision's ImageFolder order); hidden
    (`.`) and reserved (`_`, see RESERVED_PREFIX) folders are not classes."""
    if not folder.is_dir():
        raise DatasetError(f"data folder not found: {folder}")
    classes = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith((".", RESERVED_PREFIX))
    )
    if not classes:
        raise DatasetError(
            f"{folder} holds no class folders; put each class's images in its own sub-folder "
            "(e.g. CEX/ and PG/)"
        )
    return classes


def list_labelled_files(folder: Path, classes: Sequence[str]) -> list[LabelledFile]:
    """Image files under `folder/<class>/`, labelled by the class's index in `classes`."""
    files: list[LabelledFile] = []
    for class_name in find_classes(folder):
        if class_name not in classes:
            raise DatasetError(
                f"class folder {folder / class_name} is not one of the known classes "
                f"{list(classes)}; remove it or include it in the training data"
            )
        label = classes.index(class_name)
        class_files = [
            LabelledFile(path, label)
            for path in sorted((folder / class_name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
            and path.is_file()
            and not path.name.startswith(".")
        ]
        if not class_files:
            raise DatasetError(
                f"class folder {folder / class_name} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
            )
        files.extend(class_files)
    return files


def detect_layout(data_dir: Path) -> Layout:
    """Split folders when DATA_DIR has both train/ and val/ sub-folders, else class folders."""
    has_splits = all((data_dir / name).is_dir() for name in ("train", "val"))
    return "split-folders" if has_splits else "class-folders"


def split_stratified(
    files: Sequence[LabelledFile],
    num_classes: int,
    fractions: tuple[float, float, float],
    seed: int,
) -> tuple[list[LabelledFile], list[LabelledFile], list[LabelledFile]]:
    """Split each class by `fractions` (train, validation, test), shuffled with `seed`.

    Every class with at least two images keeps one for training and gets at least
    one validation image, so early stopping on macro-F1 sees every class.
    """
    _, validation_fraction, test_fraction = fractions
    rng = np.random.default_rng(seed)
    train: list[LabelledFile] = []
    validation: list[LabelledFile] = []
    test: list[LabelledFile] = []
    for label in range(num_classes):
        members = [f for f in files if f.label == label]
        count = len(members)
        if count < 2:
            raise DatasetError(
                f"class index {label} has {count} image(s); a stratified split needs at least 2 "
                "per class (add images or give train/ and val/ folders)"
            )
        order = rng.permutation(count)
        n_test = round(count * test_fraction)
        n_validation = max(1, round(count * validation_fraction)) if validation_fraction else 0
        # Never take the last training image: shrink test first, then validation.
        while n_test + n_validation > count - 1 and n_test > 0:
            n_test -= 1
        n_validation = min(n_validation, count - 1 - n_test)
        shuffled = [members[i] for i in order]
        test.extend(shuffled[:n_test])
        validation.extend(shuffled[n_test : n_test + n_validation])
        train.extend(shuffled[n_test + n_validation :])
    return train, validation, test


def resolve_splits(
    data_dir: Path,
    layout: Literal["auto", "class-folders", "split-folders"] = "auto",
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> DatasetSplits:
    """Find the classes and the train/validation/test files of a data folder."""
    if not data_dir.is_dir():
        raise DatasetError(f"data folder not found: {data_dir}")
    resolved: Layout = detect_layout(data_dir) if layout == "auto" else layout
    if resolved == "split-folders":
        for name in ("train", "val"):
            if not (data_dir / name).is_dir():
                raise DatasetError(
                    f"{data_dir / name} is missing; a split-folder layout needs train/ and val/ "
                    "(test/ is optional), or pass --layout class-folders"
                )
        classes = tuple(find_classes(data_dir / "train"))
        splits = {
            key: list_labelled_files(data_dir / folder, classes)
            if (data_dir / folder).is_dir()
            else []
            for key, folder in SPLIT_FOLDERS.items()
        }
        return DatasetSplits(
            resolved, classes, splits["train"], splits["validation"], splits["test"]
        )
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0 or fractions[0] <= 0:
        raise DatasetError(
            f"split fractions {fractions} must be >= 0, sum to 1 and leave some training data"
        )
    classes = tuple(find_classes(data_dir))
    if {"train", "val"} <= set(classes):
        raise DatasetError(
            f"{data_dir} looks like split folders (train/, val/) but --layout class-folders was "
            "given; use --layout split-folders or auto"
        )
    if len(classes) < 2:
        raise DatasetError(f"{data_dir} has one class folder ({classes[0]}); a classifier needs 2+")
    files = list_labelled_files(data_dir, classes)
    train, validation, test = split_stratified(files, len(classes), fractions, seed)
    return DatasetSplits(resolved, classes, train, validation, test)


def load_images(
    files: Sequence[LabelledFile], *, threads: int = 2, description: str = "decode"
) -> LoadedImages:
    """Decode every file once into 2-D uint8 greyscale; unreadable files are set aside.

    OpenCV releases the GIL while decoding, so threads give a real speed-up.
    """

    def decode(item: LabelledFile) -> np.ndarray | str:
        try:
            return read_image_file(item.path)
        except DecodeError as exc:
            return str(exc)

    loaded = LoadedImages(files=[], images=[])
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = pool.map(decode, files)
        for item, result in tqdm(
            zip(files, results, strict=True),
            total=len(files),
            desc=description,
            unit="img",
            mininterval=1.0,
            leave=False,
            disable=None,
        ):
            if isinstance(result, str):
                loaded.unreadable.append((item.path, result))
            else:
                loaded.files.append(item)
                loaded.images.append(result)
    return loaded


def count_per_class(files: Sequence[LabelledFile], num_classes: int) -> list[int]:
    counts = np.bincount([f.label for f in files], minlength=num_classes)
    return [int(c) for c in counts]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
