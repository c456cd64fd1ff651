"""The shared preprocessing follows the manifest's input spec exactly."""

from __future__ import annotations

import numpy as np

from monitor.imaging.preprocess import prepare_batch, prepare_image, resize_to_input
from monitor.manifest import InputSpec

SPEC = InputSpec(size=32, resize="letterbox", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_letterbox_keeps_aspect_and_pads_with_the_median() -> None:
    wide = np.full((50, 100), 40, np.uint8)
    wide[:, :10] = 200  # a bright strip; the median stays 40
    square = resize_to_input(wide, SPEC)
    assert square.shape == (32, 32)
    assert (square[:8] == 40).all() and (square[-8:] == 40).all()
    assert square[16, 0] > 150  # the strip survives on the left edge


def test_stretch_fills_the_whole_square() -> None:
    spec = SPEC.model_copy(update={"resize": "stretch"})
    wide = np.zeros((50, 100), np.uint8)
    wide[:, 50:] = 255
    square = resize_to_input(wide, spec)
    assert square.shape == (32, 32)
    assert square[:, :14].max() == 0 and square[:, 18:].min() == 255


def test_normalisation_uses_manifest_mean_and_std() -> None:
    grey = np.full((32, 32), 255, np.uint8)
    tensor = prepare_image(grey, SPEC)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, (1.0 - 0.5) / 0.25)


def test_batch_equals_stacked_single_images() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in [(40, 60), (151, 151)]]
    batch = prepare_batch(images, SPEC)
    assert batch.shape == (2, 3, 32, 32)
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], prepare_image(image, SPEC))


def test_histogram_median_equals_numpy_median() -> None:
    """The fast letterbox fill must equal int(np.median) so trained models see the same pixels."""
    from monitor.imaging.preprocess import median_grey

    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = rng.integers(1, 40, 2)
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if rng.random() < 0.5:
            image = (image // 64 * 64).astype(np.uint8)  # many ties
        assert median_grey(image) == int(np.median(image))
