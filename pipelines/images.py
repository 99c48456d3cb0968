"""Decode an image safely: size limits, EXIF orientation, every common mode converted to 8-bit RGB."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


class ImageError(ValueError):
    """An input that is not a usable image; the message names the item and what was expected."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an uploaded or listed image must respect."""

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 32


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image, limits: ImageLimits = ImageLimits(), name: str | None = None):
    """Return the image as an upright RGB PIL image, or raise ImageError saying what is wrong."""
    if isinstance(source, Image.Image):
        label = name or "image"
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            label, data = name or "upload", bytes(source)
        else:
            path = Path(source)
            label = name or path.name
            if not path.is_file():
                raise ImageError(f"image '{label}' does not exist (looked for '{path}')")
            size = path.stat().st_size
            if size > limits.max_bytes:
                raise ImageError(f"image '{label}' is {size / 2**20:.1f} MB; at most {limits.max_bytes / 2**20:.0f} MB")
            data = path.read_bytes()
        if len(data) == 0:
            raise ImageError(f"image '{label}' is empty (0 bytes); expected a JPEG, PNG, TIFF, BMP or WebP file")
        if len(data) > limits.max_bytes:
            raise ImageError(
                f"image '{label}' is {len(data) / 2**20:.1f} MB; at most {limits.max_bytes / 2**20:.0f} MB"
            )
        try:
            with warnings.catch_warnings():
                # Pillow's own bomb warning (> 89 MP) is left to the pixel limit below, which names the limit.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                image.size  # noqa: B018 - header parsed; the pixel check below runs before decoding
        except Image.DecompressionBombError as err:  # > 179 MP: Pillow refuses to open it at all
            found = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "more than 179 MP"
            raise ImageError(f"image '{label}' has {size}; at most {limits.max_pixels / 1e6:.0f} MP is accepted") \
                from err
        except (UnidentifiedImageError, OSError) as err:
            raise ImageError(
                f"'{label}' is not a readable image ({type(err).__name__}); "
                "expected a JPEG, PNG, TIFF, BMP or WebP file"
            ) from err
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image '{label}' has {width * height / 1e6:.1f} MP ({width} x {height}); at most "
            f"{limits.max_pixels / 1e6:.0f} MP is accepted"
        )
    try:
        image = ImageOps.exif_transpose(image)
        image.load()
        image = _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image '{label}' is corrupt or truncated ({err})") from err
    if min(image.size) < limits.min_side:
        raise ImageError(
            f"image '{label}' is {image.size[0]} x {image.size[1]} px; at least {limits.min_side} x "
            f"{limits.min_side} px is required"
        )
    image.info.clear()  # drop EXIF and other metadata from anything derived from this image
    return image
