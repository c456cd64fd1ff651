"""Decode probe image files into 8-bit greyscale arrays, refusing bad input with a reason.

Vendor software writes PNG, BMP, TIFF and sometimes JPEG, 8- or 16-bit, greyscale or
RGB. Size, channels and sample depth are read from the header (Pillow reads only the
header on open) before anything is decoded, and an image is refused when its pixel
count or its decoded size (width x height x channels x bytes per sample) is over the
limits: a 381 KB PNG of 7000 x 7000 16-bit RGBA passes a 50 MP pixel limit but is
392 MB decoded. Files are read with a byte cap derived from the same limit. The
pixels are then decoded by OpenCV, which is several times faster, straight to one
grey channel (the decoder collapses colour row by row; for JPEG it keeps the luma), so
a colour file never needs all its channels in memory.
"""

from __future__ import annotations

import io
import os
import stat
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

# One grey channel at the file's own depth (8 or 16 bits, float TIFF stays float), and
# the pixels as stored: EXIF orientation would make the size differ from the header's.
_GREY_AS_STORED = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION

# PNG colour type -> channels once decoded (a palette expands to RGB).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# Pillow modes whose samples are wider than a byte.
_PILLOW_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLES_PER_PIXEL = 277


class DecodeError(Exception):
    """An input that cannot become an image; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what a decoder accepts.

    `max_decoded_bytes` bounds width x height x channels x bytes per sample as the
    header states them; None means `max_pixels` x 2 (one 16-bit channel), 100 MB by
    default. Files are read up to `max_file_bytes`, a little over that: an image within
    the limit is never bigger on disk than decoded, save for headers and metadata.
    """

    max_pixels: int = 50_000_000
    min_side: int = 8
    max_decoded_bytes: int | None = None

    @property
    def decoded_bytes_limit(self) -> int:
        if self.max_decoded_bytes is not None:
            return self.max_decoded_bytes
        return self.max_pixels * 2

    @property
    def max_file_bytes(self) -> int:
        limit = self.decoded_bytes_limit
        # Room for row filter bytes, stored deflate blocks, strips and metadata.
        return limit + limit // 16 + (1 << 20)


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says it decodes to."""

    width: int
    height: int
    channels: int
    bytes_per_sample: int

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * self.channels * self.bytes_per_sample


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Return the image as a 2-D uint8 array; raise DecodeError with a reason."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    header = read_image_header(data)
    width, height = header.width, header.height
    if width * height > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"{width} x {height} exceeds the limit of {limits.max_pixels:,} pixels",
        )
    if header.decoded_bytes > limits.decoded_bytes_limit:
        raise DecodeError(
            "decoded_too_large",
            f"{width} x {height} x {header.channels} channels x {header.bytes_per_sample} "
            f"bytes is {header.decoded_bytes:,} bytes decoded, over the limit of "
            f"{limits.decoded_bytes_limit:,} (raise the probe's max_decoded_bytes to allow it)",
        )
    if min(width, height) < limits.min_side:
        raise DecodeError(
            "too_small", f"{width} x {height} is below the minimum side of {limits.min_side} px"
        )
    if _is_truncated(data):
        raise DecodeError("truncated", "the file ends before the image data does")
    buffer = np.frombuffer(data, dtype=np.uint8)
    pixels = cv2.imdecode(buffer, _GREY_AS_STORED)
    if pixels is None or pixels.size == 0:
        raise DecodeError("corrupt_data", "the decoder could not read the pixel data")
    if pixels.shape[0] != height or pixels.shape[1] != width:
        raise DecodeError(
            "corrupt_data", f"header says {width} x {height}, pixels are {pixels.shape[1::-1]}"
        )
    return to_grey_uint8(pixels)


def read_image_header(data: bytes) -> ImageHeader:
    """Size, channels and sample depth from the header alone, without decoding pixels.

    PNG and BMP headers are read directly (the hot path: about 1 µs instead of the
    ~50 µs Pillow's open costs); other formats through Pillow, which reads only headers.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 26:
        width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
        return ImageHeader(
            int(width),
            int(height),
            _PNG_CHANNELS.get(colour_type, 4),
            2 if bit_depth == 16 else 1,
        )
    if data.startswith(b"BM") and len(data) >= 30:
        width, height, _planes, bits_per_pixel = struct.unpack("<iiHH", data[18:30])
        return ImageHeader(int(width), abs(int(height)), _bmp_channels(data, bits_per_pixel), 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return _pillow_header(image)
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "no PNG, JPEG, BMP or TIFF header") from exc
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise DecodeError("corrupt_header", str(exc)) from exc


def _bmp_channels(data: bytes, bits_per_pixel: int) -> int:
    """Channels OpenCV decodes a BMP to: a grey palette stays one channel, other palettes
    and 16/24-bit pixels become BGR, 32-bit keeps its fourth channel."""
    if bits_per_pixel == 32:
        return 4
    if bits_per_pixel > 8 or len(data) < 50:
        return 3
    (colours_used,) = struct.unpack("<I", data[46:50])
    count = colours_used or 1 << bits_per_pixel
    start = 14 + struct.unpack("<I", data[14:18])[0]
    palette = data[start : start + 4 * min(count, 256)]
    entries = [palette[i : i + 3] for i in range(0, len(palette) - 3, 4)]
    grey = bool(entries) and all(b == g == r for b, g, r in entries)
    return 1 if grey else 3


def _pillow_header(image: Image.Image) -> ImageHeader:
    width, height = image.size
    channels = len(image.getbands())
    sample_bytes = _PILLOW_SAMPLE_BYTES.get(image.mode, 1)
    tags = getattr(image, "tag_v2", None)
    if tags is not None:  # TIFF: Pillow's mode narrows 16-bit colour to 8 bits; the tags do not
        channels = max(channels, int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1)))
        bits = tags.get(_TIFF_BITS_PER_SAMPLE, (8,))
        widest = max(bits) if isinstance(bits, tuple) and bits else int(bits or 8)
        sample_bytes = max(sample_bytes, (int(widest) + 7) // 8)
    elif image.format == "JPEG":
        sample_bytes = 2 if int(getattr(image, "bits", 8)) > 8 else 1
    return ImageHeader(int(width), int(height), channels, sample_bytes)


def _is_truncated(data: bytes) -> bool:
    """OpenCV fills a cut-off PNG or JPEG with grey instead of failing; check the trailers."""
    if data.startswith(b"\x89PNG"):
        return b"IEND" not in data[-16:]
    if data.startswith(b"\xff\xd8"):
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    return False


def read_open_file(fd: int, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an open file, refusing what is not a regular file (reading a FIFO or a
    device would block a worker) and anything over `limits.max_file_bytes`.

    At most the cap plus one byte is ever read, so a file that grows while it is read is
    refused too, not read whole.
    """
    cap = limits.max_file_bytes
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DecodeError("not_a_file", "not a regular file")
        if info.st_size > cap:
            raise DecodeError(
                "file_too_large", f"{info.st_size:,} bytes, over the cap of {cap:,} bytes"
            )
        chunks = []
        remaining = cap + 1
        while remaining > 0 and (chunk := os.read(fd, min(remaining, max(info.st_size, 1 << 16)))):
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    if remaining <= 0:
        raise DecodeError("file_too_large", f"grew past the cap of {cap:,} bytes while read")
    return b"".join(chunks)


def read_image_file(path: Path, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read and decode one file; unreadable files raise DecodeError too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from exc
    try:
        data = read_open_file(fd, limits)
    finally:
        os.close(fd)
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
