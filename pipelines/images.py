"""Decode an image safely: size limits, EXIF orientation, every common mode converted to 8-bit RGB.

Single-frame DICOM files (recognised by their `DICM` marker or a .dcm/.dicom suffix) are decoded with pydicom; only
the pixel description (group 0028) and the pixel data are kept, so no patient attribute can reach a message or log.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", *DICOM_SUFFIXES}
ACCEPTED = "a JPEG, PNG, TIFF, BMP, WebP or DICOM file"


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
            raise ImageError(f"image '{label}' is empty (0 bytes); expected {ACCEPTED}")
        if len(data) > limits.max_bytes:
            raise ImageError(
                f"image '{label}' is {len(data) / 2**20:.1f} MB; at most {limits.max_bytes / 2**20:.0f} MB"
            )
        if is_dicom(data, label):
            image = _decode_dicom(data, label, limits)
        else:
            image = _open_pillow(data, label, limits)
    _check_pixels(label, *image.size, limits)
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


def _check_pixels(label: str, width: int, height: int, limits: ImageLimits) -> None:
    """Refuse an image with more pixels than the limit allows, naming its size and the limit."""
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image '{label}' has {width * height / 1e6:.1f} MP ({width} x {height}); at most "
            f"{limits.max_pixels / 1e6:.0f} MP is accepted"
        )


def _open_pillow(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Open (not decode) a JPEG, PNG, TIFF, BMP or WebP file with Pillow."""
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning (> 89 MP) is left to the pixel limit in load_image, which names the limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.size  # noqa: B018 - header parsed; load_image checks the pixel count before decoding
    except Image.DecompressionBombError as err:  # > 179 MP: Pillow refuses to open it at all
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "more than 179 MP"
        raise ImageError(f"image '{label}' has {size}; at most {limits.max_pixels / 1e6:.0f} MP is accepted") \
            from err
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(
            f"'{label}' is not a readable image ({type(err).__name__}); "
            f"expected {ACCEPTED}"
        ) from err
    return image


def is_dicom(data: bytes, name: str = "") -> bool:
    """Whether `data` is a DICOM file: the `DICM` marker after its 128-byte preamble, or a .dcm/.dicom name."""
    return data[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_SUFFIXES


def _decodable_syntaxes() -> str:
    """The pixel data encodings this installation decodes, in words (pydicom's decoders and their plugins)."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    kinds = {uid.RLELossless: "RLE", uid.JPEGBaseline8Bit: "JPEG Baseline", uid.JPEGExtended12Bit: "JPEG Extended",
             uid.JPEGLosslessSV1: "JPEG Lossless", uid.JPEGLSLossless: "JPEG-LS", uid.JPEG2000Lossless: "JPEG 2000",
             uid.HTJ2KLossless: "HTJ2K"}
    names = ["uncompressed", "deflated"] + [name for syntax, name in kinds.items() if get_decoder(syntax).is_available]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _transfer_syntax(dataset):
    """The dataset's transfer syntax; a file without file meta information is read as its encoding was found."""
    from pydicom import uid

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax:
        return uid.UID(syntax)
    implicit, little = dataset.original_encoding
    syntax = uid.ImplicitVRLittleEndian if implicit else uid.ExplicitVRLittleEndian if little else \
        uid.ExplicitVRBigEndian
    dataset.file_meta.TransferSyntaxUID = syntax
    return syntax


def _stored_range(dataset) -> tuple[float, float]:
    """The range of values after the modality transform (the same range pydicom's windowing maps onto)."""
    if dataset.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(dataset.BitsStored)
    low, high = (0.0, 2.0**bits - 1) if int(dataset.PixelRepresentation) == 0 else \
        (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if "RescaleSlope" in dataset and "RescaleIntercept" in dataset:
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def _dicom_rgb8(pixels: np.ndarray, dataset, photometric: str) -> np.ndarray:
    """8-bit RGB from decoded DICOM pixels: modality and VOI transforms for greyscale (MONOCHROME1 inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(pixels, dataset)
        low, high = _stored_range(dataset)
        if dataset.get("VOILUTSequence"):
            values = apply_voi_lut(values, dataset, prefer_lut=True)
            low, high = 0.0, 2.0 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1
        elif "WindowCenter" in dataset and "WindowWidth" in dataset:
            values = apply_voi_lut(values, dataset, prefer_lut=False)  # windowing keeps the stored range
        if high <= low:
            raise ValueError(f"the pixel value range is empty ({low:g} to {high:g})")
        grey = np.rint(np.clip((np.asarray(values, np.float64) - low) / (high - low) * 255.0, 0, 255))
        grey = grey.astype(np.uint8)
        if photometric == "MONOCHROME1":  # 0 is white
            grey = 255 - grey
        return np.repeat(grey[..., None], 3, axis=2)
    if photometric != "RGB":  # YBR_FULL(_422) left unconverted by a decoder
        pixels = convert_color_space(pixels, photometric, "RGB")
    top = 2 ** int(dataset.BitsStored) - 1
    if pixels.dtype == np.uint8 and top == 255:
        return pixels
    return np.rint(np.clip(pixels.astype(np.float64) / top * 255.0, 0, 255)).astype(np.uint8)


def _decode_dicom(data: bytes, label: str, limits: ImageLimits) -> Image.Image:
    """Decode a single-frame DICOM image to RGB; its declared size is checked before any pixel is decoded."""
    import pydicom
    from pydicom.pixels import get_decoder

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings about odd values may quote those values
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            # Only the pixel description (group 0028) and the pixel data are kept: patient, study and device
            # attributes are gone before anything below could quote them.
            del dataset[0x00000000:0x00280000]
            del dataset[0x00290000:0x7FE00010]
    except Exception as err:  # pydicom raises many kinds on a damaged file; its text is not shown (it may hold values)
        raise ImageError(f"'{label}' is not a readable DICOM file ({type(err).__name__}); expected {ACCEPTED}") \
            from None
    if "PixelData" not in dataset:
        raise ImageError(f"DICOM file '{label}' holds no pixel data; expected a DICOM image")
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        rows, columns = int(dataset.get("Rows") or 0), int(dataset.get("Columns") or 0)
        photometric = str(dataset.get("PhotometricInterpretation") or "").strip().upper()
    except (TypeError, ValueError) as err:
        raise ImageError(f"DICOM file '{label}' has an unreadable image description ({err})") from err
    if frames > 1:
        raise ImageError(f"image '{label}' has {frames} frames; a single-frame image is expected")
    if rows < 1 or columns < 1:
        raise ImageError(f"DICOM file '{label}' declares {columns} x {rows} px; expected an image size (Rows, Columns)")
    _check_pixels(label, columns, rows, limits)
    expected = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
    if photometric not in expected:
        raise ImageError(f"DICOM file '{label}' has photometric interpretation '{photometric or 'none'}'; expected "
                         f"{', '.join(expected[:-1])} or {expected[-1]}")
    syntax = _transfer_syntax(dataset)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise ImageError(f"DICOM file '{label}' stores its pixels as {syntax.name} ({syntax}), which cannot be "
                         f"decoded here; expected {_decodable_syntaxes()} pixel data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels, described = decoder.as_array(dataset)  # YBR_FULL(_422), JPEG 2000's YBR_ICT/RCT come back as RGB
            rgb = _dicom_rgb8(pixels, dataset, str(described.get("photometric_interpretation", photometric)))
        if rgb.shape != (rows, columns, 3):
            raise ValueError(f"decoded to shape {rgb.shape}, not {rows} x {columns} x 3 samples")
        return Image.fromarray(np.ascontiguousarray(rgb))
    except Exception as err:  # decoders and plugins raise many kinds; only pixel attributes are left to quote
        raise ImageError(f"DICOM file '{label}' has pixel data that could not be decoded ({err})") from err
