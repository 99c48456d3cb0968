"""Bags for multiple instance learning: tile H&E images or slides into tissue patches, slide tables, bag manifests.

A *slide* is one large H&E image (JPEG/PNG/TIFF), a pyramidal whole-slide file (SVS/NDPI/pyramidal TIFF, read
through tiffslide or openslide when installed), or a folder of patches already extracted from one case. Tiling keeps
the patches whose tissue fraction (saturation mask, Otsu threshold) reaches `min_tissue`; the bag manifest lists
one row per kept patch: slide_id, path, label, group, split, x, y, level, size, tissue_fraction. Patch tensors,
encoder features and their cache are in `pipelines.mil.features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from pipelines.config import TilingSettings
from pipelines.images import IMAGE_SUFFIXES, ImageLimits, load_image

__all__ = [
    "BAG_COLUMNS",
    "SLIDE_LIMITS",
    "SLIDE_SUFFIXES",
    "THUMBNAIL_MAX_SIDE",
    "Bag",
    "bag_from_patch_folder",
    "bag_from_patches",
    "build_bag_manifest",
    "ingest_slide_table",
    "is_whole_slide",
    "load_bag",
    "mosaic",
    "mosaic_scale",
    "read_bag_manifest",
    "sample_patches",
    "slide_level",
    "tile_image",
    "tile_whole_slide",
    "tissue_mask",
    "write_bag_manifest",
]

SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".svslide", ".bif"}
BAG_COLUMNS = ["slide_id", "path", "label", "group", "split", "x", "y", "level", "size", "tissue_fraction"]
# H&E images are large; they still must fit in memory when read whole (pyramidal slides are read region by region).
SLIDE_LIMITS = ImageLimits(max_bytes=512 * 1024 * 1024, max_pixels=400_000_000, min_side=32)
THUMBNAIL_MAX_SIDE = 2048  # the image a bag's coordinates are drawn on (heat-maps) is at most this long
MASK_BLOCK_ROWS = 512  # the tissue mask converts this many rows to float at a time


@dataclass
class Bag:
    """One slide's kept patches (N, size, size, 3 uint8) with their top-left coordinates at `level`."""

    slide_id: str
    patches: np.ndarray
    coords: np.ndarray  # (N, 2) x, y
    tissue_fraction: np.ndarray  # (N,)
    size: int
    level: int = 0
    thumbnail: Image.Image | None = None  # the image the coordinates refer to (downsampled for large slides)
    thumbnail_scale: float = 1.0  # thumbnail pixels per level pixel
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patches)


# Tissue mask


def tissue_mask(rgb: np.ndarray, saturation_bounds: tuple[float, float] = (0.04, 0.15)) -> np.ndarray:
    """Boolean tissue mask of an RGB image: HSV saturation above its Otsu threshold (clipped into the bounds).

    The clip keeps a sensible threshold when the image is almost all tissue (Otsu would split tissue in two)
    or almost all glass (Otsu would split noise). Rows are converted in blocks, so a large image needs one float
    array of its size (the saturation) rather than several.
    """
    from skimage.filters import threshold_otsu

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an RGB array (H, W, 3), got shape {rgb.shape}")
    saturation = np.empty(rgb.shape[:2], dtype=np.float32)
    bright = np.empty(rgb.shape[:2], dtype=bool)
    for start in range(0, rgb.shape[0], MASK_BLOCK_ROWS):
        rows = slice(start, start + MASK_BLOCK_ROWS)
        data = rgb[rows].astype(np.float32) / 255.0
        high, low = data.max(axis=2), data.min(axis=2)
        saturation[rows] = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
        bright[rows] = high > 0.1
    try:
        threshold = float(threshold_otsu(saturation))
    except ValueError:  # a constant image
        threshold = saturation_bounds[1]
    threshold = float(np.clip(threshold, *saturation_bounds))
    # Very dark pixels (pen marks, folds, scanner borders) are not tissue either.
    return (saturation > threshold) & bright


# Reading slides


def is_whole_slide(path: str | Path) -> bool:
    """True for whole-slide formats and pyramidal TIFFs (more than one resolution level): read region by region."""
    path = Path(path)
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return True
    if path.suffix.lower() in {".tif", ".tiff"}:
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return len(tif.series[0].levels) > 1
        except (ImportError, IndexError, OSError, ValueError):
            return False
    return False


def _open_slide(path: Path) -> tuple[Any, str]:
    """(slide, reader name) with OpenSlide's API: OpenSlide when it reads the file, else tiffslide.

    tiffslide is also taken when OpenSlide sees a single level where tiffslide finds a pyramid (SubIFD pyramids,
    as in OME-TIFF, which OpenSlide's generic TIFF reader does not follow).
    """
    failures: list[str] = []
    found = None
    try:
        import openslide

        try:
            found = (openslide.OpenSlide(str(path)), "openslide")
        except openslide.OpenSlideError as err:  # includes OpenSlideUnsupportedFormatError
            failures.append(f"openslide: {type(err).__name__}")
    except ImportError:
        failures.append("openslide: not installed")
    if found is not None and found[0].level_count > 1:
        return found
    try:
        import tiffslide

        try:
            other = tiffslide.TiffSlide(str(path))
        except Exception as err:  # noqa: BLE001 - tiffslide raises tifffile's and its own errors
            failures.append(f"tiffslide: {type(err).__name__}")
        else:
            if found is None or other.level_count > found[0].level_count:
                if found is not None:
                    found[0].close()
                return other, "tiffslide"
            other.close()
    except ImportError:
        failures.append("tiffslide: not installed")
    if found is not None:
        return found
    raise ValueError(f"'{path.name}' is not a readable whole-slide file ({'; '.join(failures)})")


def sample_patches(n: int, cap: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed random sample of `cap` of `n` patches, in their original (reading) order."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _grid_fractions(mask: np.ndarray, size: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, tissue fraction) of every grid cell, one band of rows at a time (no full-size integral image)."""
    height, width = mask.shape
    ys = np.arange(0, height - size + 1, step)
    xs = np.arange(0, width - size + 1, step)
    area = np.empty((len(ys), len(xs)), dtype=np.int64)
    for row, y in enumerate(ys):
        columns = np.concatenate([[0], np.cumsum(mask[y : y + size].sum(axis=0, dtype=np.int64))])
        area[row] = columns[xs + size] - columns[xs]
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return xx.ravel(), yy.ravel(), area.ravel() / float(size * size)


def _select(fraction: np.ndarray, settings: TilingSettings, patch_cap: int | None) -> tuple[np.ndarray, int]:
    """(indices of the kept cells, how many cells held enough tissue): `max_patches` keeps the most tissue,
    `patch_cap` then draws a fixed random sample spread over the whole tissue."""
    keep = np.flatnonzero(fraction >= settings.min_tissue)
    if settings.max_patches is not None and len(keep) > settings.max_patches:
        keep = np.sort(keep[np.argsort(-fraction[keep], kind="stable")[: settings.max_patches]])
    n_tissue = len(keep)
    if patch_cap is not None:
        keep = keep[sample_patches(len(keep), patch_cap)]
    return keep, n_tissue


def _tile_array(
    rgb: np.ndarray, settings: TilingSettings, patch_cap: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(patches, coords, tissue fractions, tissue patch count before the cap) of the grid over an RGB array."""
    size, step = settings.patch_size, settings.step
    height, width = rgb.shape[:2]
    if height < size or width < size:
        raise ValueError(f"image is {width} x {height} px; tiling needs at least {size} x {size} px (one patch)")
    xx, yy, fraction = _grid_fractions(tissue_mask(rgb, settings.saturation_bounds), size, step)
    keep, n_tissue = _select(fraction, settings, patch_cap)
    patches = np.stack([rgb[y : y + size, x : x + size] for y, x in zip(yy[keep], xx[keep])]) if len(keep) else (
        np.zeros((0, size, size, 3), dtype=np.uint8)
    )
    coords = np.stack([xx[keep], yy[keep]], axis=1) if len(keep) else np.zeros((0, 2), dtype=np.int64)
    return patches, coords, fraction[keep], n_tissue


def _overview(image: Image.Image, max_side: int = THUMBNAIL_MAX_SIDE) -> tuple[Image.Image, float]:
    """(the image itself, or a copy at most `max_side` px long, for the heat-map; its pixels per image pixel)."""
    scale = min(1.0, max_side / max(image.size))
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR, reducing_gap=2.0), size[0] / image.width


def tile_image(
    image: Image.Image | np.ndarray, settings: TilingSettings, slide_id: str = "image", patch_cap: int | None = None
) -> Bag:
    """Tile an in-memory H&E image into a bag of tissue patches (at most `patch_cap`: a fixed random sample)."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.uint8)
    try:
        patches, coords, fraction, n_tissue = _tile_array(rgb, settings, patch_cap)
    except ValueError as err:
        raise ValueError(f"slide '{slide_id}': {err}") from err
    if len(patches) == 0:
        raise ValueError(
            f"slide '{slide_id}' has no patch with at least {settings.min_tissue:.0%} tissue at "
            f"{settings.patch_size} px; is it blank, or should tiling.min_tissue be lower?"
        )
    thumbnail, scale = _overview(image if isinstance(image, Image.Image) else Image.fromarray(rgb))
    return Bag(slide_id, patches, coords, fraction, settings.patch_size, 0, thumbnail, scale,
               extra={"n_tissue_patches": n_tissue})


def slide_level(slide: Any, level: int, max_pixels: int | None, name: str) -> int:
    """The pyramid level to tile: `level`, or the first coarser one whose size is within `max_pixels`."""
    if level >= slide.level_count:
        raise ValueError(f"slide '{name}' has {slide.level_count} levels; tiling.level {level} is too deep")
    if max_pixels is None:
        return level
    for candidate in range(level, slide.level_count):
        width, height = slide.level_dimensions[candidate]
        if width * height <= max_pixels:
            return candidate
    width, height = slide.level_dimensions[-1]
    raise ValueError(
        f"slide '{name}' has no pyramid level within {max_pixels / 1e6:g} MP (its smallest, level "
        f"{slide.level_count - 1}, is {width} x {height} px)"
    )


def _slide_overview(slide: Any, level: int, name: str) -> tuple[Image.Image, float]:
    """A thumbnail of `level` read whole from the coarsest level that is still at least as detailed as needed.

    OpenSlide's own get_thumbnail may read a far larger level; here the level read is never larger than `level`
    (whose size the caller bounded) and at most SLIDE_LIMITS.max_pixels.
    """
    width, height = slide.level_dimensions[level]
    target = min(THUMBNAIL_MAX_SIDE, max(width, height))
    source = level
    for candidate in range(level + 1, slide.level_count):
        if max(slide.level_dimensions[candidate]) >= target:
            source = candidate
    src_w, src_h = slide.level_dimensions[source]
    if src_w * src_h > SLIDE_LIMITS.max_pixels:
        raise ValueError(f"slide '{name}': its overview level {source} is {src_w} x {src_h} px, more than "
                         f"{SLIDE_LIMITS.max_pixels / 1e6:.0f} MP; a slide needs a pyramid level of at most that size")
    region = slide.read_region((0, 0), source, (src_w, src_h)).convert("RGB")
    scale = min(1.0, THUMBNAIL_MAX_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    thumbnail = region if region.size == size else region.resize(size, Image.BILINEAR, reducing_gap=2.0)
    return thumbnail, size[0] / width


def tile_whole_slide(
    path: str | Path,
    settings: TilingSettings,
    slide_id: str | None = None,
    max_pixels: int | None = None,
    patch_cap: int | None = None,
) -> Bag:
    """Tile a pyramidal whole-slide file: the mask comes from a thumbnail, patches from regions.

    The level is `settings.level`, or with `max_pixels` the first coarser level whose size is within it (the bag's
    `extra` says which, and which reader: OpenSlide first, tiffslide when OpenSlide cannot read the file).
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    slide, reader = _open_slide(path)
    try:
        level = slide_level(slide, settings.level, max_pixels, path.name)
        width, height = slide.level_dimensions[level]
        downsample = float(slide.level_downsamples[level])
        thumbnail, scale = _slide_overview(slide, level, path.name)
        mask = tissue_mask(np.asarray(thumbnail), settings.saturation_bounds)
        size, step = settings.patch_size, settings.step
        if width < size or height < size:
            raise ValueError(f"slide '{slide_id}' level {level} is {width} x {height} px; tiling needs at least "
                             f"{size} x {size} px")
        coords, fractions = [], []
        for y in range(0, height - size + 1, step):
            for x in range(0, width - size + 1, step):
                y0, x0 = int(y * scale), int(x * scale)
                cell = mask[y0 : max(y0 + 1, int((y + size) * scale)), x0 : max(x0 + 1, int((x + size) * scale))]
                coords.append((x, y))
                fractions.append(float(cell.mean()) if cell.size else 0.0)
        fraction = np.asarray(fractions, dtype=np.float64)
        keep, n_tissue = _select(fraction, settings, patch_cap)
        if not len(keep):
            raise ValueError(f"slide '{slide_id}' has no patch with at least {settings.min_tissue:.0%} tissue")
        kept = [coords[i] for i in keep]
        patches = []
        for x, y in tqdm(kept, desc=f"reading {slide_id}", leave=False, disable=len(kept) < 200):
            # read_region takes level-0 coordinates and a size at the requested level
            region = slide.read_region((int(x * downsample), int(y * downsample)), level, (size, size))
            patches.append(np.asarray(region.convert("RGB")))
    finally:
        slide.close()
    extra = {"n_tissue_patches": n_tissue, "reader": reader, "requested_level": settings.level,
             "level_downsample": downsample, "level_size": (width, height)}
    return Bag(slide_id, np.stack(patches), np.asarray(kept, dtype=np.int64), fraction[keep], size, level, thumbnail,
               scale, extra)


def bag_from_patch_folder(folder: str | Path, settings: TilingSettings, slide_id: str | None = None) -> Bag:
    """A bag from a folder of pre-extracted patches (resized to `patch_size`); `x_y` in a file name gives coords."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"patch folder '{folder}' holds no image files ({sorted(IMAGE_SUFFIXES)})")
    return bag_from_patches([load_image(p) for p in files], settings, slide_id or folder.name, [p.stem for p in files])


def bag_from_patches(
    images: Sequence[Image.Image], settings: TilingSettings, slide_id: str, names: Sequence[str] | None = None
) -> Bag:
    """A bag from patch images of one case; they are resized to `patch_size` and laid out on a grid."""
    import re

    size = settings.patch_size
    patches = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])
    coords = []
    for name in names or [str(i) for i in range(len(images))]:
        match = re.search(r"x?(\d+)[_-]y?(\d+)$", name)  # "..._512_1024" or "x512_y1024"
        coords.append((int(match.group(1)), int(match.group(2))) if match and names else (-1, -1))
    coords_arr = np.asarray(coords, dtype=np.int64)
    if (coords_arr < 0).any():  # no coordinates in the names: a square grid, for display only
        cols = int(np.ceil(np.sqrt(len(patches))))
        coords_arr = np.asarray([((i % cols) * size, (i // cols) * size) for i in range(len(patches))])
    fraction = np.asarray([tissue_mask(p, settings.saturation_bounds).mean() for p in patches])
    scale = mosaic_scale(coords_arr, size)
    return Bag(slide_id, patches, coords_arr, fraction, size, 0, mosaic(patches, coords_arr, size, scale), scale)


def mosaic_scale(coords: np.ndarray, size: int, max_side: int = THUMBNAIL_MAX_SIDE) -> float:
    """Canvas pixels per coordinate pixel so that the mosaic of these patches is at most `max_side` long."""
    extent = max(int(coords[:, 0].max()), int(coords[:, 1].max())) + size
    return min(1.0, max_side / extent)


def mosaic(patches: np.ndarray, coords: np.ndarray, size: int, scale: float = 1.0) -> Image.Image:
    """Paste patches at their coordinates (times `scale`) on a white canvas (the thumbnail of a patch folder)."""
    side = max(1, int(round(size * scale)))
    width, height = int(coords[:, 0].max() * scale) + side, int(coords[:, 1].max() * scale) + side
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for patch, (x, y) in zip(patches, coords):
        tile = patch if side == size else np.asarray(Image.fromarray(patch).resize((side, side), Image.BILINEAR))
        x0, y0 = int(x * scale), int(y * scale)
        canvas[y0 : y0 + side, x0 : x0 + side] = tile
    return Image.fromarray(canvas)


def load_bag(
    source: str | Path | Image.Image,
    settings: TilingSettings,
    slide_id: str | None = None,
    limits: ImageLimits | None = None,
    patch_cap: int | None = None,
) -> Bag:
    """Tile one slide, whatever it is: a PIL image, an image file, a whole-slide file or a folder of patches.

    `limits` bound what is read: file size; decoded pixels of a flat image (default SLIDE_LIMITS); for a whole
    slide, the pyramid level, whose size must be within `limits.max_pixels` (default: no bound, read by region).
    `patch_cap` bounds the patches kept (a fixed random sample over the tissue; the bag's
    `extra["n_tissue_patches"]` counts them all).
    """
    if isinstance(source, Image.Image):
        return tile_image(source, settings, slide_id or "image", patch_cap)
    path = Path(source)
    if path.is_dir():
        return bag_from_patch_folder(path, settings, slide_id)
    if not path.exists():
        raise FileNotFoundError(f"slide '{path}' does not exist")
    if is_whole_slide(path):
        if limits is None:  # read region by region: no size bound unless the caller sets one
            return tile_whole_slide(path, settings, slide_id, None, patch_cap)
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ValueError(f"slide '{path.name}' is {size / 2**20:.1f} MB; at most "
                             f"{limits.max_bytes / 2**20:.0f} MB")
        return tile_whole_slide(path, settings, slide_id, limits.max_pixels, patch_cap)
    if settings.level != 0:
        raise ValueError(f"'{path.name}' is a flat image with one level; tiling.level must be 0, got {settings.level}")
    return tile_image(load_image(path, limits or SLIDE_LIMITS), settings, slide_id or path.stem, patch_cap)


# Slide tables and bag manifests


def ingest_slide_table(
    root: str | Path,
    labels: str = "labels.csv",
    images: str = "images",
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
) -> pd.DataFrame:
    """Slide rows (image_id, path, label, group, split='', source='real') from a labels CSV and an image folder."""
    root = Path(root)
    csv = root / labels
    if not csv.is_file():
        raise FileNotFoundError(f"labels CSV '{csv}' does not exist; expected columns {image_column},{label_column}")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    needed = [c for c in (image_column, label_column, group_column) if c]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"'{csv}' lacks columns {missing}; it has {list(table.columns)}")
    paths = [root / images / name for name in table[image_column]]
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} slides listed in '{csv}' do not exist, e.g. '{absent[0]}'")
    ids = [Path(name).stem for name in table[image_column]]
    return pd.DataFrame(
        {
            "image_id": ids,
            "path": [str(p.resolve()) for p in paths],
            "label": table[label_column].to_numpy(),
            "group": table[group_column].to_numpy() if group_column else ids,
            "split": "",
            "source": "real",
        }
    )


def build_bag_manifest(slides: pd.DataFrame, settings: TilingSettings) -> pd.DataFrame:
    """Tile every slide of a slide table; one row per kept patch (slide id, coordinates, label, group, split)."""
    rows = []
    for slide in tqdm(slides.itertuples(index=False), total=len(slides), desc="tiling", leave=False):
        bag = load_bag(slide.path, settings, slide.image_id)
        for (x, y), fraction in zip(bag.coords, bag.tissue_fraction):
            rows.append(
                {
                    "slide_id": slide.image_id,
                    "path": slide.path,
                    "label": slide.label,
                    "group": slide.group,
                    "split": getattr(slide, "split", ""),
                    "x": int(x),
                    "y": int(y),
                    "level": bag.level,
                    "size": bag.size,
                    "tissue_fraction": round(float(fraction), 4),
                }
            )
    return pd.DataFrame(rows, columns=BAG_COLUMNS)


def write_bag_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a bag manifest CSV atomically."""
    from pipelines.manifest import write_csv_atomic

    missing = [c for c in BAG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"bag manifest lacks columns {missing}; expected {BAG_COLUMNS}")
    return write_csv_atomic(df, path)


def read_bag_manifest(path: str | Path) -> pd.DataFrame:
    """Read a bag manifest CSV and check its columns."""
    df = pd.read_csv(path, dtype={"slide_id": str, "label": str, "group": str, "split": str}, keep_default_na=False)
    missing = [c for c in BAG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"bag manifest '{path}' lacks columns {missing}; expected {BAG_COLUMNS}")
    return df

