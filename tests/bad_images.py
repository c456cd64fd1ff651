"""Bad image files as the tests need them: written here, never downloaded."""

from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims a huge image (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def png_rgba16_zeros(width: int, height: int) -> bytes:
    """A real, decodable 16-bit RGBA PNG of zeros: a few hundred KB on disk for 7000 x 7000,
    but width x height x 8 bytes once decoded (a bomb under any pixel limit)."""
    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width * 8)  # filter byte + 4 samples of 2 bytes per pixel
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def with_bad_iccp(png: bytes) -> bytes:
    """The PNG with an iCCP chunk whose profile is too short: libpng prints
    "libpng warning: iCCP: ..." on stderr and decodes the image anyway."""
    assert png[12:16] == b"IHDR"
    after_ihdr = 8 + 8 + 13 + 4
    chunk = _png_chunk(b"iCCP", b"broken\0\0" + zlib.compress(b"not an ICC profile" * 4))
    return png[:after_ihdr] + chunk + png[after_ihdr:]
