"""Decode probe image files into 8-bit greyscale arrays, refusing bad input with a reason.

Vendor software writes PNG, BMP, TIFF and sometimes JPEG, 8- or 16-bit, greyscale or
RGB. The pixel count is checked from the header (Pillow reads only the header on
open) before anything is decoded, so a file claiming 50,000 x 50,000 pixels costs
nothing. The pixels are then decoded by OpenCV, which is several times faster.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Pillow's own bomb check would fire before ours with a less useful message.
Image.MAX_IMAGE_PIXELS = None
# A failed decode is reported once, by us, with its reason; OpenCV's own warnings are noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class DecodeError(Exception):
    """An input that cannot become an image; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what a decoder accepts."""

    max_pixels: int = 50_000_000
    min_side: int = 8


DEFAULT_LIMITS = DecodeLimits()


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Return the image as a 2-D uint8 array; raise DecodeError with a reason."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    width, height = _image_size(data)
    if width * height > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"{width} x {height} exceeds the limit of {limits.max_pixels:,} pixels",
        )
    if min(width, height) < limits.min_side:
        raise DecodeError(
            "too_small", f"{width} x {height} is below the minimum side of {limits.min_side} px"
        )
    if _is_truncated(data):
        raise DecodeError("truncated", "the file ends before the image data does")
    buffer = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise DecodeError("corrupt_data", "the decoder could not read the pixel data")
    if pixels.shape[0] != height or pixels.shape[1] != width:
        raise DecodeError(
            "corrupt_data", f"header says {width} x {height}, pixels are {pixels.shape[1::-1]}"
        )
    return to_grey_uint8(pixels)


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding pixels.

    PNG and BMP headers are read directly (the hot path: about 1 µs instead of the
    ~50 µs Pillow's open costs); other formats through Pillow, which reads only headers.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return int(width), abs(int(height))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as header:
                size: tuple[int, int] = header.size
                return size
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "no PNG, JPEG, BMP or TIFF header") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError("corrupt_header", str(exc)) from exc


def _is_truncated(data: bytes) -> bool:
    """OpenCV fills a cut-off PNG or JPEG with grey instead of failing; check the trailers."""
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-16:]
    if data.startswith(b"\xff\xd8"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return False


def read_image_file(path: Path, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one file; unreadable files raise DecodeError too."""
    try:
        if path.stat().st_size > limits.max_pixels * 8:
            raise DecodeError("file_too_large", f"{path.stat().st_size:,} bytes")
        data = path.read_bytes()
    except DecodeError:
        raise
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    return decode_image(data, limits)


def to_grey_uint8(pixels: np.ndarray) -> np.ndarray:
    """Collapse colour to grey and 10-16-bit data to 8 bits.

    A 16-bit container often holds 10, 12 or 14 significant bits; scaling by the bits
    actually used keeps such images as bright as the 8-bit images the model saw.
    """
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels == 1:
            pixels = pixels[:, :, 0]
        elif channels == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2GRAY)
        else:
            raise DecodeError("unsupported_layout", f"{channels} channels")
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    if pixels.dtype == np.uint16:
        peak = int(pixels.max())
        bits = max(8, peak.bit_length())
        return (pixels >> (bits - 8)).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        finite = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if float(finite.max()) <= 1.0 else 1.0
        grey: np.ndarray = np.clip(finite * scale, 0, 255).astype(np.uint8)
        return grey
    raise DecodeError("unsupported_layout", f"pixel type {pixels.dtype}")
