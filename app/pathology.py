"""Pathology tab: one H&E image (or several patches of one case) -> bag prediction, attention heat-map, top patches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.bags import Bag, bag_from_patches, load_bag
from pipelines.images import ImageError, load_image
from pipelines.mil import predict_bag, tiling_of

log = logging.getLogger(__name__)

API_NAME = "predict_slide"
TOP_PATCHES = 6


@dataclass
class SlideAnalysis:
    """What the tab shows: class probabilities, the attention heat-map over the tissue and the top patches."""

    probabilities: dict[str, float]
    prob_malignant: float | None
    heatmap: Image.Image
    top_patches: list[tuple[Image.Image, str]]
    attention: np.ndarray
    n_patches: int


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
    colours = colormaps["turbo"](heat)[..., :3].astype(np.float32)
    out = np.where(covered[..., None], (1 - alpha) * rgb + alpha * colours, rgb * 0.6 + 0.4)  # background greyed
    return Image.fromarray((out * 255).clip(0, 255).astype(np.uint8))


def analyze_slide(bundle, images: Sequence[str | Path | Image.Image], top_k: int = TOP_PATCHES) -> SlideAnalysis:
    """Predict one case: a single H&E image is tiled; several images are taken as that case's patches."""
    if not images:
        raise ValueError("no image given; upload one H&E image or several patches of one case")
    settings = tiling_of(bundle)
    if len(images) == 1:
        image = load_image(images[0], name=Path(images[0]).name if not isinstance(images[0], Image.Image) else None)
        bag = load_bag(image, settings, "upload")
    else:
        bag = bag_from_patches([load_image(im) for im in images], settings, "upload")
    prediction = predict_bag(bundle, bag)
    names = bundle.class_names
    probabilities = {name: float(p) for name, p in zip(names, prediction.probs)}
    malignant = [names.index(c) for c in bundle.malignant_classes if c in names]
    prob_malignant = float(prediction.probs[malignant].sum()) if malignant else None
    order = np.argsort(-prediction.attention)[:top_k]
    top = [
        (Image.fromarray(bag.patches[i]), f"attention {prediction.attention[i]:.3f} at ({bag.coords[i][0]}, "
                                          f"{bag.coords[i][1]})")
        for i in order
    ]
    return SlideAnalysis(probabilities, prob_malignant, attention_heatmap(bag, prediction.attention), top,
                         prediction.attention, len(bag))


def _describe(bundle, analysis: SlideAnalysis) -> str:
    lines = [
        f"**{analysis.n_patches} tissue patches** analysed; attention sums to 1 over them "
        f"(heat-map: blue = lowest, red = highest attention in this case; grey = background, not analysed)."
    ]
    threshold = bundle.operating_threshold
    if analysis.prob_malignant is not None:
        lines.append(f"P(malignant) = **{analysis.prob_malignant:.3f}**")
        if threshold is not None:
            verdict = "at or above" if analysis.prob_malignant >= threshold else "below"
            lines.append(f"{verdict} the operating threshold {threshold:.3f} chosen on validation slides")
    lines.append("_Research prototype: not a diagnosis._")
    return "  \n".join(lines)


def build_pathology_tab(bundles: dict[str, Any], janitor: Any = None) -> None:
    """Create the Pathology tab inside the current `gr.Tabs()`/`gr.Blocks` context (api_name 'predict_slide').

    Uploads are deleted after each request by `janitor` (the app's `FileJanitor`; a private one when None).
    """
    import gradio as gr

    if not bundles:
        raise ValueError("the pathology tab needs at least one MIL bundle")
    names = sorted(bundles)
    if janitor is None:
        from gradio.utils import get_upload_folder

        from app.server import FileJanitor

        janitor = FileJanitor(get_upload_folder(), grace_s=1.0)

    def predict(files, model_name: str):
        if not files:
            raise gr.Error("Upload one H&E image, or several patches of one case.", print_exception=False)
        if model_name not in bundles:
            raise gr.Error(f"Unknown model '{model_name}'; choose one of {names}.", print_exception=False)
        paths = [f if isinstance(f, str) else getattr(f, "name", f) for f in files]
        held = janitor.hold(paths)
        try:
            analysis = analyze_slide(bundles[model_name], paths)
        except (ImageError, ValueError) as err:
            # the message names the user's file: it goes to the user only, never to the server log
            raise gr.Error(str(err), print_exception=False) from None
        finally:
            janitor.release(held)
        return analysis.probabilities, analysis.heatmap, analysis.top_patches, _describe(
            bundles[model_name], analysis
        )

    with gr.Tab("Pathology", id="pathology"):
        gr.Markdown("Upload **one H&E image** (it is tiled into tissue patches) or **several patches of one case**. "
                    "The attention-MIL model predicts the case; the heat-map shows which patches it weighed most.")
        with gr.Row():
            files = gr.File(label="H&E image or patches", file_count="multiple", type="filepath",
                            elem_id="pathology-files")
            model = gr.Dropdown(names, value=names[0], label="MIL model", elem_id="pathology-model")
        button = gr.Button("Analyse case", variant="primary", elem_id="pathology-run")
        with gr.Row():
            label = gr.Label(label="Case prediction", elem_id="pathology-label")
            note = gr.Markdown(elem_id="pathology-note")
        heatmap = gr.Image(label="Attention over the tissue", type="pil", elem_id="pathology-heatmap")
        gallery = gr.Gallery(label="Highest-attention patches", columns=TOP_PATCHES, elem_id="pathology-top")
        button.click(predict, [files, model], [label, heatmap, gallery, note], api_name=API_NAME)
