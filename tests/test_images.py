"""The shared image decoder names the pixel limit for very large images, before decoding any pixel."""

from __future__ import annotations

import re
import struct
import zlib

import pytest

from pipelines.images import ImageError, ImageLimits, load_image


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (header only: opening it must not decode anything)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height", "shown"), [(10_000, 10_000, "100.0 MP"), (20_000, 10_000, "200.0 MP"),
                                                        (8_000, 7_000, "56.0 MP")])
def test_huge_images_are_refused_with_the_limit(width, height, shown):
    with pytest.raises(ImageError, match=rf"image 'scan.png' has {shown}.*; at most 50 MP is accepted"):
        load_image(_png_header(width, height), ImageLimits(), name="scan.png")


@pytest.mark.parametrize(("data", "shown"), [(b"plain text, not a picture", "'notes.jpg' is not a readable image"),
                                             (b"", "image 'notes.jpg' is empty (0 bytes)")])
def test_unreadable_files_are_told_every_accepted_format(data, shown):
    with pytest.raises(ImageError, match=re.escape(shown) + ".*; expected a JPEG, PNG, TIFF, BMP, WebP or DICOM file"):
        load_image(data, name="notes.jpg")
