"""Decoding of probe image files: every format the vendors write, and every bad input refused."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.decode import DecodeError, DecodeLimits, decode_image, read_image_file, to_grey_uint8
from tests.bad_images import png_claiming


def _encoded(image: np.ndarray, suffix: str) -> bytes:
    ok, buffer = cv2.imencode(suffix, image)
    assert ok
    return buffer.tobytes()


def _gradient(height: int = 60, width: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff", ".jpg"])
def test_8bit_grey_formats_decode_to_the_same_pixels(suffix: str) -> None:
    image = _gradient()
    decoded = decode_image(_encoded(image, suffix))
    assert decoded.shape == image.shape
    assert decoded.dtype == np.uint8
    tolerance = 3 if suffix == ".jpg" else 0
    assert np.abs(decoded.astype(int) - image.astype(int)).max() <= tolerance


def test_rgb_with_identical_channels_becomes_the_grey_image() -> None:
    grey = _gradient()
    decoded = decode_image(_encoded(cv2.merge([grey, grey, grey]), ".png"))
    assert np.array_equal(decoded, grey)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_16bit_images_scale_by_the_bits_in_use(suffix: str) -> None:
    twelve_bit = _gradient().astype(np.uint16) * 16  # 0..4080: a 12-bit camera
    decoded = decode_image(_encoded(twelve_bit, suffix))
    assert decoded.max() == 255
    assert np.abs(decoded.astype(int) - _gradient().astype(int)).max() <= 1


def test_full_range_16bit_image_keeps_its_top_byte() -> None:
    full = np.full((20, 20), 65535, np.uint16)
    full[0, 0] = 256
    decoded = to_grey_uint8(full)
    assert decoded[1, 1] == 255 and decoded[0, 0] == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"this is a text file named frame.png\n", "not_an_image"),
        (png_claiming(50_000, 50_000), "too_many_pixels"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def test_truncated_png_is_refused() -> None:
    data = _encoded((np.random.default_rng(1).random((200, 200)) * 255).astype(np.uint8), ".png")
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.reason in {"truncated", "corrupt_data"}


def test_truncated_jpeg_is_refused() -> None:
    data = _encoded((np.random.default_rng(2).random((200, 200)) * 255).astype(np.uint8), ".jpg")
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.reason in {"truncated", "corrupt_data"}


def test_one_pixel_image_is_too_small() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(_encoded(np.zeros((1, 1), np.uint8), ".png"))
    assert caught.value.reason == "too_small"


def test_pixel_limit_is_configurable() -> None:
    data = _encoded(_gradient(100, 100), ".png")
    with pytest.raises(DecodeError) as caught:
        decode_image(data, DecodeLimits(max_pixels=9_999))
    assert caught.value.reason == "too_many_pixels"
    assert decode_image(data, DecodeLimits(max_pixels=10_000)).shape == (100, 100)


def test_missing_file_and_symlink_loop_are_unreadable(tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    for path in (tmp_path / "absent.png", loop):
        with pytest.raises(DecodeError) as caught:
            read_image_file(path)
        assert caught.value.reason == "unreadable"
