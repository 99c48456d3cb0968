"""Explanations of one prediction: Grad-CAM for CNNs, attention rollout for ViTs, and the heat-map overlay."""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.bundle import Bundle
from models.classifier import FeatureMap
from pipelines.transforms import card_transform

__all__ = [
    "HEATMAP_COLOURS",
    "LEGEND_HEIGHT",
    "Explainer",
    "Explanation",
    "gradcam_target_layer",
    "is_vit",
    "overlay_heatmap",
    "with_colour_bar",
]

log = logging.getLogger(__name__)


@dataclass
class Explanation:
    """A heat-map (H x W in [0, 1], the model's input crop) for one class, and how it was made."""

    heatmap: np.ndarray
    crop: Image.Image
    class_index: int
    method: str

    def overlay(self, alpha: float = 0.45, min_side: int = 320, legend: bool = True) -> Image.Image:
        """The crop the model saw with the heat-map blended over it (RGB, no metadata), at least `min_side` px wide;
        with `legend`, a colour bar underneath says which colour means what."""
        crop = self.crop
        if crop.size[0] < min_side:
            crop = crop.resize((min_side, min_side), Image.Resampling.BICUBIC)
        blended = overlay_heatmap(crop, self.heatmap, alpha)
        return with_colour_bar(blended) if legend else blended


LEGEND_HEIGHT = 34
HEATMAP_COLOURS = "jet"


def with_colour_bar(image: Image.Image) -> Image.Image:
    """`image` with the heat-map's colour bar under it: 'weak' (blue) to 'strong' (red) evidence."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    width, height = image.size
    canvas = Image.new("RGB", (width, height + LEGEND_HEIGHT), (255, 255, 255))
    canvas.paste(image, (0, 0))
    margin, bar_top, bar_height = 46, height + 6, 10
    ramp = np.linspace(0.0, 1.0, max(1, width - 2 * margin), dtype=np.float32)
    bar = (colormaps[HEATMAP_COLOURS](ramp)[..., :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(bar[None], bar_height, axis=0), "RGB"), (margin, bar_top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, bar_top - 1), "weak", fill=(0, 0, 0))
    draw.text((width - margin + 6, bar_top - 1), "strong", fill=(0, 0, 0))
    draw.text((margin, bar_top + bar_height + 3), "evidence for the explained class", fill=(60, 60, 60))
    return canvas


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Blend a [0, 1] heat-map (any size) over `image` with the heat-map colour map."""
    from matplotlib import colormaps

    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape != (image.size[1], image.size[0]):
        heat_image = Image.fromarray((heat * 255).astype(np.uint8), "L").resize(image.size, Image.Resampling.BILINEAR)
        heat = np.asarray(heat_image, dtype=np.float32) / 255.0
    colours = colormaps[HEATMAP_COLOURS](heat)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * colours
    return Image.fromarray((np.clip(blended, 0, 1) * 255).astype(np.uint8), "RGB")


def _identity(x):
    return x


def _normalise(heat: np.ndarray) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    low, high = float(heat.min()), float(heat.max())
    if high - low < 1e-12:
        return np.zeros_like(heat)
    return (heat - low) / (high - low)


def gradcam_target_layer(model: nn.Module) -> str:
    """Name of the layer Grad-CAM reads: the backbone's last feature map after its final activation.

    The activation matters: before it (e.g. EfficientNet's head BatchNorm) the map holds values the ReLU6 clips
    away, and those, strongest at the zero-padded borders, dominated the map.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no `.backbone`; Grad-CAM needs an ImageClassifier")
    marked = [name for name, m in model.named_modules() if isinstance(m, FeatureMap)]
    if marked:
        return marked[-1]
    relus = [name for name, m in model.named_modules()
             if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU)) and name.startswith("backbone")]
    if not relus:
        raise ValueError(f"{type(model).__name__} has no marked feature map or activation layer; Grad-CAM needs a "
                         "convolutional backbone")
    return relus[-1]


def _frozen_prefixes(model: nn.Module, target: str) -> tuple[str, ...]:
    """Prefixes ('name.') of the parameter-holding modules that need no gradient for a Grad-CAM read at `target`.

    Those are the modules registered before `target`, except the last one: its parameters keep the graph alive up
    to `target` when the target itself has none. For the backbones Grad-CAM is used on (EfficientNet, the small
    CNN) registration order is execution order.
    """
    earlier: list[str] = []
    for name, module in model.named_modules():
        if name == target:
            return tuple(earlier[:-1])
        if name and any(True for _ in module.parameters(recurse=False)):
            earlier.append(name + ".")
    raise ValueError(f"layer '{target}' is not in {type(model).__name__}")


def is_vit(model: nn.Module) -> bool:
    """True for the ViT classifier (MONAI ViT kept in `backbone.vit`)."""
    return hasattr(getattr(model, "backbone", None), "vit")


class Explainer:
    """Heat-maps for a bundle's image classifier; thread-safe, with its own copy of the network.

    The copy keeps Grad-CAM's hooks and gradients away from the predictor's network, which serves other requests
    meanwhile.
    """

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        # An ensemble is explained through its first member (the network and preprocessing it shares with it).
        explained = bundle.members[0] if bundle.members else bundle
        self.transform = card_transform(explained.card)
        self.model = copy.deepcopy(explained.model).cpu().eval()
        for module in self.model.modules():
            if hasattr(module, "inplace"):
                module.inplace = False  # in-place activations break full backward hooks
        self.method = "attention" if is_vit(self.model) else "gradcam"
        self._cam = None
        self._lock = threading.Lock()

    def _gradcam(self, batch: torch.Tensor, class_index: int) -> np.ndarray:
        from monai.visualize import GradCAM

        if self._cam is None:
            target = gradcam_target_layer(self.model)
            # Gradients are only needed from the logits back to the target layer: freezing everything before it
            # keeps the backward pass to the network's tail (several times cheaper than a full backward on a CPU).
            frozen = _frozen_prefixes(self.model, target)
            for name, param in self.model.named_parameters():
                param.requires_grad_(not name.startswith(frozen))
            # MONAI's default post-processing maps (min, max) to (1, 0), i.e. it flips the map; the raw map is
            # kept and scaled to [0, 1] (max = strongest evidence) by `_normalise` below.
            self._cam = GradCAM(nn_module=self.model, target_layers=target, postprocessing=_identity)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            heat = self._cam(batch, class_idx=class_index)
        return heat[0, 0].detach().cpu().numpy()

    @torch.no_grad()
    def _attention(self, batch: torch.Tensor) -> np.ndarray:
        """Attention rollout (Abnar & Zuidema 2020): from the class token when the ViT has one, else the mean of all
        output tokens (a mean-pooled ViT)."""
        self.model(batch)
        vit = self.model.backbone.vit
        tokens = None
        rollout = None
        for block in vit.blocks:
            att = block.attn.att_mat
            if att is None or att.numel() == 0:
                raise RuntimeError("the ViT did not save its attention (build it with save_attn=True)")
            att = att[0].mean(0)  # heads averaged: (N, N)
            tokens = att.shape[-1]
            att = att + torch.eye(tokens)  # the residual connection
            att = att / att.sum(-1, keepdim=True)
            rollout = att if rollout is None else att @ rollout
        side = int(round((tokens - 1) ** 0.5))
        if side * side == tokens - 1:  # a class token (pretrained ViT): the embedding is its output row
            relevance = rollout[0, 1:].numpy()
            tokens -= 1
        else:  # no class token: the embedding is the mean of all outputs, so patch j contributes mean_i rollout[i, j]
            relevance = rollout.mean(0).numpy()
            side = int(round(tokens**0.5))
        if side * side != tokens:
            raise RuntimeError(f"{tokens} patch tokens do not form a square grid")
        grid = _normalise(relevance.reshape(side, side))
        size = self.bundle.input_size
        up = Image.fromarray((grid * 255).astype(np.uint8), "L").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(up, dtype=np.float32) / 255.0

    def explain(self, image: Image.Image, class_index: int) -> Explanation:
        """Heat-map of the evidence for `class_index` over the crop the model sees of `image` (RGB)."""
        n_classes = len(self.bundle.class_names)
        if not 0 <= class_index < n_classes:
            raise ValueError(f"class index {class_index} is out of range; the model has {n_classes} classes")
        crop = self.transform.resize_crop(image.convert("RGB"))
        batch = self.transform.normalize(np.asarray(crop)).unsqueeze(0)
        with self._lock:
            if self.method == "attention":
                heat = self._attention(batch)
            else:
                heat = self._gradcam(batch, class_index)
        return Explanation(heatmap=_normalise(heat), crop=crop, class_index=class_index, method=self.method)
