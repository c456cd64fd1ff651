"""Decoding of probe image files: every format the vendors write, and every bad input refused."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.imaging.decode import (
    DecodeError,
    DecodeLimits,
    decode_image,
    read_image_file,
    to_grey_uint8,
)
from tests.bad_images import png_claiming, png_rgba16_zeros


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


@pytest.mark.parametrize(
    ("image", "suffix", "decoded_bytes"),
    [
        (np.zeros((100, 100, 4), np.uint16), ".png", 100 * 100 * 4 * 2),
        (np.zeros((100, 100), np.uint16), ".png", 100 * 100 * 2),
        (np.zeros((100, 100, 3), np.uint16), ".tiff", 100 * 100 * 3 * 2),
        (np.zeros((100, 100, 3), np.uint8), ".jpg", 100 * 100 * 3),
        (np.zeros((100, 100, 3), np.uint8), ".bmp", 100 * 100 * 3),
        (np.zeros((100, 100), np.uint8), ".bmp", 100 * 100),
    ],
    ids=["png-rgba16", "png-grey16", "tiff-rgb16", "jpeg-rgb", "bmp-rgb", "bmp-grey"],
)
def test_decoded_size_from_the_header_counts_channels_and_sample_bytes(
    image: np.ndarray, suffix: str, decoded_bytes: int
) -> None:
    """The limit is on width x height x channels x bytes per sample, exactly at the edge."""
    data = _encoded(image, suffix)
    with pytest.raises(DecodeError) as caught:
        decode_image(data, DecodeLimits(max_decoded_bytes=decoded_bytes - 1))
    assert caught.value.reason == "decoded_too_large"
    assert "max_decoded_bytes" in caught.value.detail  # the message names the fix
    assert decode_image(data, DecodeLimits(max_decoded_bytes=decoded_bytes)).shape == (100, 100)


def test_png_bomb_under_the_pixel_limit_is_refused_by_decoded_size() -> None:
    """2,000 x 2,000 16-bit RGBA: 4 MP passes a 5 MP pixel limit, but 32 MB decoded does
    not pass the 10 MB derived from it (max_pixels x 2 bytes)."""
    bomb = png_rgba16_zeros(2000, 2000)
    limits = DecodeLimits(max_pixels=5_000_000)
    assert limits.decoded_bytes_limit == 10_000_000
    with pytest.raises(DecodeError) as caught:
        decode_image(bomb, limits)
    assert caught.value.reason == "decoded_too_large"
    assert decode_image(
        bomb, DecodeLimits(max_pixels=5_000_000, max_decoded_bytes=32_000_000)
    ).shape == (
        2000,
        2000,
    )


def test_files_over_the_byte_cap_are_refused_and_those_at_it_are_read(tmp_path: Path) -> None:
    limits = DecodeLimits(max_pixels=1_000_000)
    cap = limits.max_file_bytes
    assert cap > limits.decoded_bytes_limit  # room for headers: an image at the limit is read
    over, at = tmp_path / "over.png", tmp_path / "at.png"
    for path, size in ((over, cap + 1), (at, cap)):
        with path.open("wb") as sparse:
            sparse.truncate(size)
    with pytest.raises(DecodeError) as caught:
        read_image_file(over, limits)
    assert caught.value.reason == "file_too_large"
    with pytest.raises(DecodeError) as caught:
        read_image_file(at, limits)
    assert caught.value.reason == "not_an_image"  # read whole and looked at: zeros


def test_colour_files_decode_straight_to_the_grey_of_their_channels() -> None:
    """Colour is collapsed by the decoder (no BGR copy in memory): within one grey level
    of converting the colour pixels, for 8- and 16-bit PNG, TIFF and BMP."""
    rng = np.random.default_rng(4)
    colour = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    expected = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY).astype(int)
    for image, suffix in (
        (colour, ".png"),
        (colour.astype(np.uint16) * 257, ".png"),
        (colour, ".tiff"),
        (cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA), ".png"),
        (colour, ".bmp"),
    ):
        decoded = decode_image(_encoded(image, suffix))
        assert np.abs(decoded.astype(int) - expected).max() <= 1, (suffix, image.dtype)
