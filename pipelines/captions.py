"""DermaFlux-style captions: ABCD descriptors + metadata -> one sentence set per image, stored in the manifest."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.abcd import abcd_descriptors
from pipelines.config import HAM10000_MALIGNANT, CaptionConfig, stage_settings
from pipelines.stage import StageOutputs

log = logging.getLogger(__name__)

DIAGNOSIS_NAMES = {
    "akiec": "actinic keratosis or intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
ABCD_COLUMNS = ["abcd_asymmetry", "abcd_border", "abcd_colour_count", "abcd_colours", "abcd_diameter_px"]
LLM_INSTRUCTION = (
    "Rewrite this description of a dermoscopy image as fluent clinical prose for an image caption. Keep every fact "
    "and number, add nothing, answer with the caption only.\n\n"
)


def _describe_asymmetry(axes: int) -> str:
    return {0: "symmetric about both principal axes", 1: "asymmetric along one axis"}.get(
        axes, "asymmetric along both axes"
    )


def _describe_border(irregularity: float) -> str:
    if irregularity < 0.2:
        return "regular and smooth"
    if irregularity < 0.5:
        return "slightly irregular"
    return "irregular and ragged"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _known(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip().lower() not in ("", "unknown", "nan")


def caption_from_descriptors(descriptors: dict[str, Any], metadata: dict[str, Any], malignant: bool | None) -> str:
    """A deterministic DermaFlux-style caption from ABCD descriptors and the image's metadata."""
    label = str(metadata.get("label", "")).strip()
    parts = []
    if malignant is None:
        parts.append("This photo depicts a skin lesion.")
    else:
        parts.append(f"This photo depicts a {'malignant' if malignant else 'benign'} lesion.")
    if label:
        parts.append(f"The diagnosis is {DIAGNOSIS_NAMES.get(label, label)}.")
    who = []
    if _known(metadata.get("age")):
        who.append(f"{int(float(metadata['age']))}-year-old")
    who.append(str(metadata["sex"]).lower() if _known(metadata.get("sex")) else "patient")
    site = f" on the {str(metadata['localization']).lower()}" if _known(metadata.get("localization")) else ""
    if site or len(who) > 1 or who[0] != "patient":
        parts.append(f"It is located{site} of a {' '.join(who)}.")
    if not descriptors.get("lesion_found", True):
        parts.append("No lesion border could be delineated.")
        return " ".join(parts)
    parts.append(
        f"The lesion is {_describe_asymmetry(descriptors['asymmetric_axes'])} "
        f"(asymmetry index {descriptors['asymmetry']:.2f})."
    )
    parts.append(
        f"Its border is {_describe_border(descriptors['border_irregularity'])} "
        f"(irregularity index {descriptors['border_irregularity']:.2f})."
    )
    found = descriptors["colours"]
    if found:
        noun = "colour" if len(found) == 1 else "colours"
        parts.append(f"It shows {len(found)} of the six dermoscopic {noun}: {_join(found)}.")
    else:
        parts.append("It shows none of the six dermoscopic colours clearly.")
    parts.append(f"Its largest diameter is about {descriptors['diameter_px']:.0f} px.")
    return " ".join(parts)


class LLMRewriter:
    """Rewrites template captions with a local instruction-tuned causal LM (greedy, so repeatable)."""

    def __init__(self, model_path: str | Path, max_new_tokens: int = 120, device: str = "cpu") -> None:
        self.model_path = Path(model_path)
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not self.model_path.is_dir():
            raise FileNotFoundError(f"LLM folder '{self.model_path}' does not exist; give a local transformers model")
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self._model = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True).to(self.device)
        self._model.eval()

    def rewrite(self, caption: str, must_keep: list[str]) -> str:
        """The rewritten caption, or the template itself when the rewrite drops one of `must_keep`."""
        import torch

        if self._model is None:
            self._load()
        tokenizer = self._tokenizer
        message = LLM_INSTRUCTION + caption
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = message + "\n\nCaption:"
        inputs = tokenizer(prompt, return_tensors="pt").to(self.device)
        with torch.no_grad():
            output = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        text = " ".join(text.split())
        if not text or any(word.lower() not in text.lower() for word in must_keep):
            log.debug("LLM rewrite dropped a key fact; keeping the template caption")
            return caption
        return text


def caption_image(
    image: Any, metadata: dict[str, Any], malignant: bool | None, rewriter: LLMRewriter | None = None
) -> tuple[str, dict[str, Any]]:
    """(caption, descriptors) for one PIL image and its metadata row."""
    descriptors = abcd_descriptors(image)
    caption = caption_from_descriptors(descriptors, metadata, malignant)
    if rewriter is not None:
        keep = ["malignant" if malignant else "benign"] if malignant is not None else []
        caption = rewriter.rewrite(caption, keep)
    return caption, descriptors


def caption_manifest(
    manifest: pd.DataFrame,
    splits: list[str] | None = None,
    malignant_classes: list[str] | tuple[str, ...] = HAM10000_MALIGNANT,
    rewriter: LLMRewriter | None = None,
) -> pd.DataFrame:
    """A copy of the manifest with `caption` and ABCD columns filled for the rows in `splits` (all when None)."""
    from tqdm import tqdm

    from pipelines.images import load_image

    df = manifest.copy()
    for column in ["caption", *ABCD_COLUMNS]:
        if column not in df.columns:
            df[column] = ""
        df[column] = df[column].astype(object)
    selected = df.index if splits is None else df.index[df.split.isin(splits)]
    for index in tqdm(selected, desc="captions", unit="img", disable=len(selected) < 50):
        row = df.loc[index].to_dict()
        if "malignant" in row and _known(row["malignant"]):
            malignant = bool(int(float(row["malignant"])))
        else:
            malignant = row["label"] in malignant_classes if malignant_classes else None
        caption, desc = caption_image(load_image(row["path"]), row, malignant, rewriter)
        df.at[index, "caption"] = caption
        df.at[index, "abcd_asymmetry"] = round(desc["asymmetry"], 4)
        df.at[index, "abcd_border"] = round(desc["border_irregularity"], 4)
        df.at[index, "abcd_colour_count"] = desc["colour_count"]
        df.at[index, "abcd_colours"] = ";".join(desc["colours"])
        df.at[index, "abcd_diameter_px"] = round(desc["diameter_px"], 1)
    log.info("captioned %d of %d manifest rows", len(selected), len(df))
    return df




def run_caption_stage(config: Any, run_dir: str | Path, manifest_path: str | Path | None = None) -> StageOutputs:
    """Caption the run's manifest (`run_dir/manifest.csv` unless given); returns `run_dir/manifest_captioned.csv`."""
    from pipelines.manifest import read_manifest, write_manifest

    settings = stage_settings(config, "captions", CaptionConfig)
    run_dir = Path(run_dir)
    manifest_path = Path(manifest_path) if manifest_path else run_dir / "manifest.csv"
    rewriter = LLMRewriter(settings.llm, settings.llm_max_new_tokens) if settings.llm else None
    df = caption_manifest(read_manifest(manifest_path), settings.splits, settings.malignant_classes, rewriter)
    return StageOutputs(manifest=write_manifest(df, run_dir / "manifest_captioned.csv"))
