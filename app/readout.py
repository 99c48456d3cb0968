"""The ABCD readout shown next to a prediction, from the same descriptors the captioning stage writes."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipelines.abcd import abcd_descriptors

__all__ = ["abcd_readout", "outline_image", "readout_markdown"]


def abcd_readout(image: Image.Image) -> tuple[dict[str, Any], np.ndarray]:
    """(ABCD descriptors of an RGB image as JSON-able numbers, the lesion mask), both from pipelines.abcd."""
    descriptors = abcd_descriptors(image)
    readout = {
        "lesion_found": bool(descriptors["lesion_found"]),
        "asymmetry": round(float(descriptors["asymmetry"]), 3),
        "asymmetric_axes": int(descriptors["asymmetric_axes"]),
        "border_irregularity": round(float(descriptors["border_irregularity"]), 3),
        "colour_count": int(descriptors["colour_count"]),
        "colours": list(descriptors["colours"]),
        "diameter_px": round(float(descriptors["diameter_px"]), 1),
        "image_size_px": list(image.size),
    }
    return readout, descriptors["mask"]


def readout_markdown(readout: dict[str, Any]) -> str:
    """The readout as a short Markdown table with what each number means."""
    if not readout["lesion_found"]:
        return "**ABCD readout:** no lesion border could be delineated in this image, so no ABCD values are given."
    colours = ", ".join(readout["colours"]) if readout["colours"] else "none clearly"
    width, height = readout["image_size_px"]
    rows = [
        ("A: asymmetry", f"{readout['asymmetry']:.2f}", f"asymmetric about {readout['asymmetric_axes']} of 2 axes "
         "(0 = mirror-symmetric)"),
        ("B: border irregularity", f"{readout['border_irregularity']:.2f}",
         "0 = smooth round border, towards 1 = ragged"),
        ("C: dermoscopic colours", f"{readout['colour_count']} of 6", colours),
        ("D: largest diameter", f"{readout['diameter_px']:.0f} px", f"in the uploaded image ({width} x {height} px); "
         "mm need the dermatoscope's scale"),
    ]
    lines = ["| feature | value | meaning |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {meaning} |" for name, value, meaning in rows]
    lines.append("")
    lines.append("_Computed from an automatic lesion mask (the white outline on the image) by the same code that "
                 "writes the training captions; a rough guide, not a measurement._")
    return "\n".join(lines)


def outline_image(image: Image.Image, mask: np.ndarray, side: int = 384) -> Image.Image:
    """A thumbnail of `image` (longest side `side`) with the lesion mask's outline drawn in white."""
    from scipy import ndimage

    scale = min(1.0, side / max(image.size))
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    thumb = np.array(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    small = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    edge = small & ~ndimage.binary_erosion(small, iterations=2)
    thumb[edge] = (255, 255, 255)
    return Image.fromarray(thumb, "RGB")
