"""Pathology tab: one H&E image, a whole-slide file or several patches of one case -> bag prediction, referral,
attention heat-map, top patches.

What is read is bounded like the image tabs (the server's file-size and megapixel limits, checked from the file
header before decoding) and the number of patches analysed per case is capped (a fixed random sample over the
tissue, which the note states). Inputs unlike the H&E training images get a visible warning, never silence.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.janitor import FileJanitor
from app.ops import Ops, with_request
from app.wording import (
    case_note_markdown,
    pathology_card_markdown,
    pathology_referral_html,
    referral_decision,
    warnings_html,
)
from pipelines.bags import Bag, bag_from_patches, is_whole_slide, load_bag, tile_image
from pipelines.images import ImageError, ImageLimits, load_image
from pipelines.mil import predict_bag, tiling_of

__all__ = [
    "API_NAME",
    "MAX_CASE_PATCHES",
    "MIN_BLUE_EXCESS",
    "MIN_CASE_PATCHES",
    "TOP_PATCHES",
    "SlideAnalysis",
    "analyze_slide",
    "attention_heatmap",
    "blue_excess",
    "build_pathology_tab",
    "case_details",
    "case_warnings",
    "load_case",
    "public_message",
]

log = logging.getLogger(__name__)

API_NAME = "predict_slide"
TOP_PATCHES = 6
# At most this many patches are analysed per case (a fixed random sample over the tissue beyond it): the encoder's
# time grows with the patches (benchmarks/results/pathology_limits); the training images gave 16-42 each.
MAX_CASE_PATCHES = 512
# Fewer tissue patches than this and the case is far smaller than the images the model was trained on.
MIN_CASE_PATCHES = 8
# H&E stains absorb green more than blue (eosin pink, hematoxylin purple): over the stained pixels of the analysed
# patches, blue exceeds green by 0.21-0.32 (x 255) on the 58 UCSB images; on HAM10000 dermoscopy images (skin,
# melanin) by under 0.15 in 99 % (benchmarks/results/pathology_limits).
MIN_BLUE_EXCESS = 0.15


@dataclass
class SlideAnalysis:
    """What the tab shows: class probabilities, the attention heat-map over the tissue, the top patches, warnings."""

    probabilities: dict[str, float]
    prob_malignant: float | None
    heatmap: Image.Image
    top_patches: list[tuple[Image.Image, str]]
    attention: np.ndarray
    n_patches: int
    n_tissue_patches: int = 0
    warnings: list[str] = field(default_factory=list)
    blue_excess: float = 0.0
    level: int = 0


# ------------------------------------------------------------------------------------------------ checks


def blue_excess(patches: np.ndarray, max_pixels: int = 2_000_000) -> float:
    """Mean (blue - green) / 255 over the stained pixels of the patches (saturation over 0.1, not near-black).

    H&E tissue is pink and purple (blue above green); skin, melanin and most photographs are not. 0 when under 1 %
    of the pixels are stained (a grey or blank image).
    """
    pixels = patches.reshape(-1, 3)
    if len(pixels) > max_pixels:  # an evenly spaced subset is enough for a mean
        pixels = pixels[:: int(np.ceil(len(pixels) / max_pixels))]
    high, low = pixels.max(axis=1).astype(np.int16), pixels.min(axis=1).astype(np.int16)
    stained = (high > 25) & ((high - low) * 10 > high)
    if stained.mean() < 0.01:
        return 0.0
    chosen = pixels[stained].astype(np.int16)
    return float((chosen[:, 2] - chosen[:, 1]).mean() / 255.0)


def case_warnings(bag: Bag, requested_level: int, card: dict[str, Any], score: float) -> list[str]:
    """Warnings (not refusals) for a case outside what the model was validated on; each says what was seen."""
    out = []
    counts = (card.get("training") or {}).get("patches_per_slide")
    trained = f"{counts[0]}-{counts[-1]}" if isinstance(counts, list) and counts else "many more"
    if len(bag) < MIN_CASE_PATCHES:
        out.append(f"Only {len(bag)} tissue patch{'es' if len(bag) != 1 else ''} of {bag.size} px could be analysed "
                   f"(the training images gave {trained} each): this is much less tissue than the model was "
                   "validated on, or not a tissue image at all.")
    if score < MIN_BLUE_EXCESS:
        out.append(f"The colours do not look like H&E staining (blue exceeds green by {score:.2f} over the stained "
                   f"pixels; H&E training images by at least {MIN_BLUE_EXCESS:.2f}). Is this a dermoscopy or clinical "
                   "photograph, another stain, or a grey-scale image? The model knows only H&E breast tissue.")
    n_tissue = int(bag.extra.get("n_tissue_patches", len(bag)))
    if n_tissue > len(bag):
        out.append(f"This case has {n_tissue:,} tissue patches; a fixed random sample of {len(bag):,} of them, spread "
                   "over the whole tissue, was analysed (the rest were not looked at).")
    if bag.level != requested_level:
        width, height = bag.extra.get("level_size", ("?", "?"))
        out.append(f"The slide was read at pyramid level {bag.level} ({width} x {height} px, "
                   f"{bag.extra.get('level_downsample', 0):.0f}x downsampled) to stay within the server's pixel "
                   "limit: a lower magnification than the model was trained on.")
    return out


# ------------------------------------------------------------------------------------------------ analysis


def attention_heatmap(bag: Bag, attention: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The slide image with each patch tinted by its attention (turbo colour map: blue lowest, red highest)."""
    from matplotlib import colormaps

    base = (bag.thumbnail or Image.new("RGB", (bag.size, bag.size), "white")).convert("RGB")
    rgb = np.asarray(base, dtype=np.float32) / 255.0
    heat = np.zeros(rgb.shape[:2], dtype=np.float32)
    covered = np.zeros(rgb.shape[:2], dtype=bool)
    scale, side = bag.thumbnail_scale, max(1, int(round(bag.size * bag.thumbnail_scale)))
    spread = float(attention.max() - attention.min())
    # min-max over the case, so that contrast shows even when attention is nearly uniform
    weights = (attention - attention.min()) / spread if spread > 1e-9 else np.full_like(attention, 0.5)
    for (x, y), w in zip(bag.coords, weights):
        x0, y0 = int(round(x * scale)), int(round(y * scale))
        region = (slice(y0, y0 + side), slice(x0, x0 + side))
        heat[region] = np.maximum(heat[region], w)
        covered[region] = True
    colours = colormaps["turbo"](heat, bytes=True)[..., :3].astype(np.float32) / 255.0
    out = np.where(covered[..., None], (1 - alpha) * rgb + alpha * colours, rgb * 0.6 + 0.4)  # background greyed
    return Image.fromarray((out * 255).clip(0, 255).astype(np.uint8))


def _label(source: str | Path | Image.Image, name: str | None, index: int) -> str:
    if name:
        return Path(name).name
    return Path(source).name if not isinstance(source, Image.Image) else f"image_{index}"


def _check_case_pixels(sources: Sequence[str | Path | Image.Image], limits: ImageLimits) -> None:
    """Refuse a case whose images hold more than `limits.max_pixels` together, from their headers (no decoding)."""
    total = 0
    for source in sources:
        if isinstance(source, Image.Image):
            total += source.width * source.height
            continue
        try:
            if Path(source).stat().st_size > limits.max_bytes:
                continue  # load_image names the file and the limit
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(source) as image:
                    total += image.width * image.height
        except Exception:  # noqa: BLE001 - an unreadable file is named by load_image below
            continue
    if total > limits.max_pixels:
        raise ImageError(f"the {len(sources)} images of this case hold {total / 1e6:.1f} MP together; a case may hold "
                         f"at most {limits.max_pixels / 1e6:g} MP")


def load_case(
    bundle,
    images: Sequence[str | Path | Image.Image],
    limits: ImageLimits | None = None,
    max_patches: int = MAX_CASE_PATCHES,
    names: Sequence[str | None] | None = None,
) -> Bag:
    """The bag of one case within the limits: a single image is tiled (a whole-slide file at a level within the
    pixel limit), several images are that case's patches."""
    if not images:
        raise ValueError("no image given; upload one H&E image or several patches of one case")
    limits = limits or ImageLimits()
    settings = tiling_of(bundle)
    labels = [_label(source, (names or [None] * len(images))[i], i) for i, source in enumerate(images)]
    if len(images) == 1:
        source, label = images[0], labels[0]
        if not isinstance(source, Image.Image) and is_whole_slide(source):
            return load_bag(source, settings, Path(label).stem, limits=limits, patch_cap=max_patches)
        return tile_image(load_image(source, limits, name=label), settings, Path(label).stem, max_patches)
    if len(images) > max_patches:
        raise ImageError(f"{len(images)} patch images were given; a case may have at most {max_patches}")
    _check_case_pixels(images, limits)
    decoded = [load_image(source, limits, name=label) for source, label in zip(images, labels)]
    bag = bag_from_patches(decoded, settings, "case", [Path(label).stem for label in labels])
    bag.extra["n_tissue_patches"] = len(bag)
    return bag


def analyze_slide(
    bundle,
    images: Sequence[str | Path | Image.Image],
    top_k: int = TOP_PATCHES,
    limits: ImageLimits | None = None,
    max_patches: int = MAX_CASE_PATCHES,
    names: Sequence[str | None] | None = None,
) -> SlideAnalysis:
    """Predict one case: a single H&E image or whole-slide file is tiled; several images are that case's patches.

    `limits` bound every file (size, decoded pixels; for a case of patches, their pixels together); at most
    `max_patches` patches are analysed. `names` are the files' names as the user knows them (for messages).
    """
    bag = load_case(bundle, images, limits, max_patches, names)
    prediction = predict_bag(bundle, bag)
    class_names = bundle.class_names
    probabilities = {name: float(p) for name, p in zip(class_names, prediction.probs)}
    malignant = [class_names.index(c) for c in bundle.malignant_classes if c in class_names]
    prob_malignant = float(prediction.probs[malignant].sum()) if malignant else None
    order = np.argsort(-prediction.attention)[:top_k]
    top = [
        (Image.fromarray(bag.patches[i]), f"attention {prediction.attention[i]:.3f} at ({bag.coords[i][0]}, "
                                          f"{bag.coords[i][1]})")
        for i in order
    ]
    score = blue_excess(bag.patches)
    return SlideAnalysis(
        probabilities, prob_malignant, attention_heatmap(bag, prediction.attention), top, prediction.attention,
        len(bag), int(bag.extra.get("n_tissue_patches", len(bag))),
        case_warnings(bag, tiling_of(bundle).level, bundle.card, score), score, bag.level,
    )


def case_details(bundle, analysis: SlideAnalysis) -> dict[str, Any]:
    """The JSON the API returns beside the display: full-precision numbers and every warning."""
    return {
        "probabilities": analysis.probabilities,
        "p_malignant": analysis.prob_malignant,
        "operating_threshold": bundle.operating_threshold,
        "referral": referral_decision(analysis.prob_malignant, bundle.card),
        "n_patches": analysis.n_patches,
        "n_tissue_patches": analysis.n_tissue_patches,
        "level": analysis.level,
        "blue_excess": round(analysis.blue_excess, 4),
        "warnings": analysis.warnings,
        "model_version": bundle.card.get("model_version"),
    }


# ------------------------------------------------------------------------------------------------ the tab

# An absolute path (POSIX or Windows) up to its last separator; what follows, the file's own name, is kept.
_DIRECTORY = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])+")


def public_message(err: BaseException, paths: Sequence[str], names: Sequence[str]) -> str:
    """An error's text for the user: every server path replaced by the user's own file name, folders removed."""
    text = str(err)
    for path, name in zip(paths, names):
        for form in sorted({str(path), str(Path(path).resolve())}, key=len, reverse=True):
            text = text.replace(form, name)
    return _DIRECTORY.sub("", text)


def _refusal(message: str) -> Any:
    """The gr.Error a refused case shows: it stays on screen until closed, and is not logged with a traceback."""
    import gradio as gr

    return gr.Error(message, duration=None, title="This case cannot be analysed", print_exception=False)


def _case_predictor(bundles: dict[str, Any], janitor: FileJanitor, limits: ImageLimits, max_patches: int,
                    ops: Ops) -> Any:
    """The tab's request handler (API 'predict_slide'): one case in, the six outputs of the tab out."""
    names = sorted(bundles)

    @with_request
    def predict(files, model_name: str, request: Any = None):
        if not files:
            raise _refusal("Upload one H&E image, a whole-slide file, or several patches of one case.")
        if model_name not in bundles:
            raise _refusal(f"Unknown model '{model_name}'; choose one of {names}.")
        paths = [str(f if isinstance(f, (str, Path)) else getattr(f, "name", f)) for f in files]
        shown = [Path(p).name for p in paths]  # Gradio keeps the user's file name as the last path component
        bundle = bundles[model_name]
        with ops.observe(API_NAME, model_name, request) as call:
            call.n_images = len(paths)
            held = janitor.hold(paths)
            try:
                analysis = analyze_slide(bundle, paths, limits=limits, max_patches=max_patches, names=shown)
            except (ValueError, OSError, ImportError) as err:  # ImageError is a ValueError
                # the message names the user's file: it goes to the user only, never to the server log
                log.info("pathology: rejected a case (%s)", type(err).__name__)
                call.fail(err)
                raise _refusal(public_message(err, paths, shown)) from None
            except Exception as err:  # noqa: BLE001 - never show an internal message (it may hold a path)
                log.error("pathology: analysis failed (%s)", type(err).__name__)
                call.fail(err)
                raise _refusal(f"The analysis failed ({type(err).__name__}); the file may be damaged.") from None
            finally:
                janitor.release(held)
            call.referral = referral_decision(analysis.prob_malignant, bundle.card)
        note = case_note_markdown(analysis.n_patches, analysis.n_tissue_patches, analysis.prob_malignant,
                                  bundle.card, len(analysis.warnings))
        return (warnings_html(analysis.warnings) + pathology_referral_html(analysis.prob_malignant, bundle.card),
                analysis.probabilities, analysis.heatmap, analysis.top_patches, note, case_details(bundle, analysis))

    return predict


def build_pathology_tab(
    bundles: dict[str, Any],
    janitor: FileJanitor | None = None,
    limits: ImageLimits | None = None,
    max_patches: int = MAX_CASE_PATCHES,
    ops: Ops | None = None,
) -> None:
    """Create the Pathology tab inside the current `gr.Tabs()`/`gr.Blocks` context (api_name 'predict_slide').

    `limits` are the server's file limits (`ServeSettings.limits()`: file size and megapixels, the same as the
    image tabs; ImageLimits() when None); at most `max_patches` patches are analysed per case. Uploads are deleted
    after each request by `janitor` (the app's `FileJanitor`; a private one when None). Requests are counted and
    audited by `ops` (the app's `app.ops.Ops`; a private one without an audit log when None).
    """
    import gradio as gr
    from gradio.utils import get_upload_folder

    if not bundles:
        raise ValueError("the pathology tab needs at least one MIL bundle")
    limits = limits or ImageLimits()
    names = sorted(bundles)
    janitor = janitor or FileJanitor(get_upload_folder(), grace_s=1.0)
    ops = ops or Ops({name: bundle.card.get("model_version") for name, bundle in bundles.items()})
    predict = _case_predictor(bundles, janitor, limits, max_patches, ops)

    def card(model_name: str) -> str:
        if model_name not in bundles:
            raise _refusal(f"Unknown model '{model_name}'; choose one of {names}.")
        return pathology_card_markdown(model_name, bundles[model_name].card)

    with gr.Tab("Pathology", id="pathology"):
        gr.Markdown("Upload **one H&E image** or **whole-slide file** (it is cut into tissue patches) or **several "
                    "patches of one case**. The attention-MIL model predicts the case; the heat-map shows which "
                    "patches it weighed most.")
        with gr.Row():
            files = gr.File(label=f"H&E image, slide or patches (at most {limits.max_bytes / 2**20:g} MB a file and "
                                  f"{limits.max_pixels / 1e6:g} megapixels a case; {max_patches} patches analysed "
                                  "at most)", file_count="multiple", type="filepath", elem_id="pathology-files")
            model = gr.Dropdown(names, value=names[0], label="MIL model", elem_id="pathology-model")
        button = gr.Button("Analyse case", variant="primary", elem_id="pathology-run")
        referral = gr.HTML(label="Referral", elem_id="pathology-referral")
        with gr.Row():
            label = gr.Label(label="Case prediction", elem_id="pathology-label")
            note = gr.Markdown(elem_id="pathology-note")
        heatmap = gr.Image(label="Attention over the tissue", type="pil", elem_id="pathology-heatmap")
        gallery = gr.Gallery(label="Highest-attention patches", columns=TOP_PATCHES, elem_id="pathology-top")
        with gr.Accordion("Details (JSON)", open=False):
            details = gr.JSON(label="details", elem_id="pathology-details")
        card_box = gr.Markdown(pathology_card_markdown(names[0], bundles[names[0]].card), elem_id="pathology-card")
        button.click(predict, [files, model], [referral, label, heatmap, gallery, note, details], api_name=API_NAME)
        model.change(card, [model], [card_box], api_visibility="private")
