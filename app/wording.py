"""What the clinician reads: the referral headline, capped probabilities, measured performance, the model cards
(image and pathology), the notes on the page and the heat-map's caption.

Every function turns numbers from a prediction and a bundle's card into text; none of them touches a model, a file
or the network, so the wording can be tested on its own.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from pipelines.captions import DIAGNOSIS_NAMES

__all__ = [
    "BELOW",
    "INTENDED_USE",
    "NO_REFERRAL",
    "REFER",
    "TRAINING_POPULATION",
    "batch_note",
    "card_markdown",
    "case_note_markdown",
    "class_name",
    "compare_text",
    "explanation_markdown",
    "file_types_note",
    "interval_words",
    "ood_warnings",
    "pathology_card_markdown",
    "pathology_referral_html",
    "percent",
    "performance_markdown",
    "privacy_note",
    "probabilities_markdown",
    "probability_text",
    "referral_badge",
    "referral_decision",
    "referral_html",
    "referral_markdown",
    "scope_warnings",
    "warnings_html",
    "threshold_meaning",
]

REFER = "Refer: above the referral threshold"
BELOW = "Below the referral threshold"
NO_REFERRAL = "No referral threshold"
BADGE_COLOURS = {REFER: ("#9b1c1c", "#fde8e8"), BELOW: ("#03543f", "#def7ec"), NO_REFERRAL: ("#374151", "#f3f4f6")}
TRAINING_POPULATION = (
    "Trained on dermoscopy images of mostly light-skinned patients (HAM10000: Austria and Australia); not validated "
    "on darker skin or on clinical (non-dermoscopic) photographs. It knows only the classes listed: any other kind "
    "of lesion is given one of them."
)
INTENDED_USE = (
    "**Research use only. Not a diagnostic device.** lesionlab is a research prototype: it has not been cleared or "
    "approved by any regulator, and its output must not be used to diagnose, treat or triage patients. Every "
    "result below needs a clinician's own examination and judgement."
)


def class_name(code: str) -> str:
    """The full diagnosis name of a class code ("melanoma (mel)"); unknown codes as they are."""
    return f"{DIAGNOSIS_NAMES[code]} ({code})" if code in DIAGNOSIS_NAMES else code


def percent(value: Any) -> str:
    """A share as a whole percentage ("93 %"); "n/a" when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.0f} %"


def interval_words(interval: Any, as_percent: bool = True) -> str:
    """A card's bootstrap interval {low, high} in words, e.g. ' (95 % interval 60–71 %)'; '' when there is none."""
    if not isinstance(interval, dict) or not all(isinstance(interval.get(k), (int, float)) for k in ("low", "high")):
        return ""
    if as_percent:
        return f" (95 % interval {100 * interval['low']:.0f}–{100 * interval['high']:.0f} %)"
    return f" (95 % interval {interval['low']:.2f}–{interval['high']:.2f})"


def probability_text(p: float) -> str:
    """A probability as the screen shows it: whole percent, capped at "> 99 %" and "< 1 %"."""
    if p > 0.99:
        return "> 99 %"
    if p < 0.01:
        return "< 1 %"
    return f"{100 * p:.0f} %"


def compare_text(p: float, threshold: float) -> tuple[str, str]:
    """`p` and `threshold` printed with the fewest decimals (at least 2) that keep them apart when they differ.

    "0.298 below 0.298" cannot happen: the side is decided on the exact values, and the digits follow.
    """
    for digits in range(2, 16):
        if p == threshold or f"{p:.{digits}f}" != f"{threshold:.{digits}f}":
            return f"{p:.{digits}f}", f"{threshold:.{digits}f}"
    return repr(p), repr(threshold)


MAX_ASPECT_RATIO = 3.0  # dermoscopy images are close to square; the model sees the centre square only
MIN_SIDE_FRACTION = 0.5  # sides under half the model's input are enlarged by more than 2x


def scope_warnings(width: int, height: int, input_size: int) -> list[str]:
    """Warnings (not refusals) for images outside what the model was validated on: extreme shapes, tiny images."""
    warnings = []
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        warnings.append(f"This image is {ratio:.0f} times {'wider' if width > height else 'taller'} than it is "
                        f"{'tall' if width > height else 'wide'} ({width} x {height} px): the model saw only its "
                        "centre square, and was validated on near-square dermoscopy images. Check that the lesion "
                        "is in the centre, or crop the image around it.")
    if min(width, height) < MIN_SIDE_FRACTION * input_size:
        warnings.append(f"This image is small ({width} x {height} px) against the model's {input_size} px input: "
                        "it was enlarged, and the model was validated on larger images.")
    return warnings


def ood_warnings(score: float | None, ood: dict[str, Any] | None) -> list[str]:
    """A warning (not a refusal) when an image's out-of-distribution score is above the card's `ood` threshold."""
    if score is None or not ood or not score > float(ood["threshold"]):
        return []
    share = 100 - float(ood.get("percentile", 99.0))
    return [f"This image looks unlike the dermoscopy images the model was trained on (its out-of-distribution score "
            f"{score:.1f} is above {float(ood['threshold']):.1f}, a level only about {share:g} % of the validation "
            "images exceed; clinical photographs, microscopy slides, screenshots and small or heavily compressed "
            "images score high); the result may be unreliable."]


def warnings_html(warnings: list[str]) -> str:
    """The warnings as a yellow notice above the result ("" when there are none)."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return ('<div class="ll-warning" style="background:#fdf6b2;color:#723b13;border:1px solid #c27803;'
            f'border-radius:8px;padding:8px 12px;margin-bottom:8px"><b>Outside what this model was validated on:'
            f"</b><ul>{items}</ul></div>")


def referral_decision(p_malignant: float | None, card: dict[str, Any]) -> str:
    """REFER, BELOW or NO_REFERRAL for a malignancy probability against the card's threshold."""
    threshold = card.get("operating_threshold")
    if not card.get("malignant_classes") or threshold is None or p_malignant is None or math.isnan(p_malignant):
        return NO_REFERRAL
    return REFER if p_malignant >= float(threshold) else BELOW


def _malignant_names(card: dict[str, Any]) -> str:
    return ", ".join(DIAGNOSIS_NAMES.get(c, c) for c in card.get("malignant_classes") or [])


def referral_badge(decision: str) -> str:
    """The coloured badge of a referral decision (REFER, BELOW or NO_REFERRAL), the headline of every tab."""
    colour, background = BADGE_COLOURS[decision]
    return (f'<div class="ll-badge" data-decision="{ {REFER: "refer", BELOW: "below"}.get(decision, "none") }" '
            f'style="background:{background};color:{colour};border:2px solid {colour};border-radius:8px;'
            f'padding:10px 14px;font-size:1.35em;font-weight:700">{html.escape(decision)}</div>')


def referral_html(p_malignant: float | None, card: dict[str, Any]) -> str:
    """The headline: a coloured badge with the referral decision, the malignancy probability and, in words, what
    the threshold means (its validated sensitivity and specificity)."""
    decision = referral_decision(p_malignant, card)
    badge = referral_badge(decision)
    if decision == NO_REFERRAL:
        if not card.get("malignant_classes") or p_malignant is None or math.isnan(p_malignant):
            text = "This model names no malignant classes, so it gives no malignancy probability or referral."
        else:
            text = (f"Malignancy probability {p_malignant:.2f} (sum of {html.escape(_malignant_names(card))}). "
                    "This model has no validated referral threshold; read the probability with care.")
        return f'{badge}<p class="ll-referral-text">{text}</p>'
    threshold = float(card["operating_threshold"])
    shown_p, shown_t = compare_text(float(p_malignant), threshold)
    side = "at or above" if decision == REFER else "below"
    meaning = threshold_meaning(decision, card, "the validation images", "lesions",
                                "at this threshold, so a lesion that worries you clinically still needs referral.")
    text = (f"Malignancy probability <b>{shown_p}</b> ({html.escape(_malignant_names(card))} together) is {side} "
            f"the referral threshold {shown_t}. {meaning}")
    return f'{badge}<p class="ll-referral-text">{text}</p>'


def threshold_meaning(decision: str, card: dict[str, Any], cases: str, noun: str, missed_advice: str) -> str:
    """What the referral threshold means, from the card's validated sensitivity and specificity; below the
    threshold, also what it missed there and `missed_advice` (the one rule both headlines word)."""
    metrics = card.get("threshold_metrics") or {}
    sensitivity, specificity = metrics.get("sensitivity"), metrics.get("specificity")
    meaning = (f"The threshold was chosen on {cases}: there the model sent on {percent(sensitivity)} of malignant "
               f"{noun} (sensitivity) and cleared {percent(specificity)} of benign ones (specificity).")
    if decision == BELOW:
        missed = None if sensitivity is None else 1 - sensitivity
        meaning += f" It missed {percent(missed)} of malignant {noun} {missed_advice}"
    return meaning


def referral_markdown(p_malignant: float | None, card: dict[str, Any]) -> str:
    """The referral decision and its numbers as plain text (for logs of the text-only API and for tests)."""
    decision = referral_decision(p_malignant, card)
    if decision == NO_REFERRAL:
        return decision
    shown_p, shown_t = compare_text(float(p_malignant), float(card["operating_threshold"]))
    return f"{decision} (P(malignant) {shown_p}, threshold {shown_t})"


def _ordered_classes(card: dict[str, Any], classes: list[str]) -> list[str]:
    """Melanoma first, then the other malignant classes, then the rest in card order."""
    malignant = list(card.get("malignant_classes") or [])
    first = [c for c in ("mel",) if c in classes]
    return first + [c for c in malignant if c in classes and c not in first] + [
        c for c in classes if c not in first and c not in malignant]


def performance_markdown(card: dict[str, Any]) -> str:
    """What the card measured, in words: per-class sensitivity (melanoma first) and calibration."""
    lines = []
    metrics = card.get("metrics") or {}
    for split in ("test", "validation"):
        block = metrics.get(split) or {}
        recall = block.get("recall") or {}
        if recall:
            order = _ordered_classes(card, list(recall))
            parts = ", ".join(f"{DIAGNOSIS_NAMES.get(c, c)} {percent(recall[c])}" for c in order)
            lines.append(f"**Measured sensitivity per class** ({split} split, {block.get('n', '?')} images the model "
                         f"never trained on): {parts}.")
            break
    calibration = card.get("calibration") or {}
    if calibration.get("method") and calibration["method"] != "none":
        test_ece = (metrics.get("test") or {}).get("ece")
        ece = f"; calibration error on the test split {test_ece:.3f}" if isinstance(test_ece, (int, float)) else ""
        lines.append(f"**Calibration:** probabilities rescaled on the validation images ({calibration['method']} "
                     f"scaling{ece}). A probability of 30 % means about 3 in 10 such cases had that diagnosis there.")
    else:
        lines.append("**Calibration:** this model's probabilities were not calibrated; treat them as scores.")
    return "\n\n".join(lines)


def probabilities_markdown(probabilities: dict[str, float]) -> str:
    """Class probabilities, highest first, rounded and capped, with full diagnosis names."""
    rows = sorted(probabilities.items(), key=lambda item: -item[1])
    lines = ["| diagnosis | probability |", "|---|---:|"]
    lines += [f"| {class_name(code)} | {probability_text(p)} |" for code, p in rows]
    return "\n".join(lines)


def _data_name(data: Any) -> str:
    """The training data's name, never a server path."""
    if not data:
        return "not recorded"
    text = str(data)
    return PurePath(text).name if ("/" in text or "\\" in text) else text


def _imbalance_words(training: dict[str, Any]) -> str | None:
    words = []
    sampler = training.get("sampler")
    if sampler == "sqrt":
        words.append("rare classes drawn more often during training (square-root sampling)")
    elif sampler == "balanced":
        words.append("every class drawn equally often during training")
    weighting = training.get("class_weighting")
    if weighting in ("effective", "inverse"):
        words.append("errors on rare classes weighted more in the loss")
    if training.get("loss") == "focal":
        words.append("focal loss (hard cases weighted more)")
    elif training.get("loss") == "logit-adjusted":
        words.append("logit-adjusted loss for the class prior")
    synthetic = sum(int(v.get("synthetic", 0)) for v in (training.get("train_counts") or {}).values()
                    if isinstance(v, dict))
    if synthetic:
        words.append(f"{synthetic:,} synthetic images added to the rare classes")
    return "; ".join(words) or None


def card_markdown(name: str, card: dict[str, Any]) -> str:
    """The clinical model card: what the model is, what it learnt from, how well it did, its limits. No paths."""
    classes = list(card.get("class_names") or [])
    training = card.get("training") or {}
    arch = card.get("architecture") or {}
    lines = [f"### Model card: {name}", ""]
    version = card.get("model_version")
    lines.append(f"- **Version:** {version}" if version else "- **Version:** not recorded")
    lines.append(f"- **Classifies into:** {', '.join(class_name(c) for c in classes)}")
    if card.get("malignant_classes"):
        lines.append(f"- **Counted as malignant:** {_malignant_names(card)}")
    counts = training.get("train_counts") or {}
    data = _data_name(training.get("data"))
    if counts:
        real = {c: int(v.get("real", 0)) for c, v in counts.items() if isinstance(v, dict)}
        per_class = ", ".join(f"{DIAGNOSIS_NAMES.get(c, c)} {n:,}" for c, n in real.items())
        lines.append(f"- **Trained on:** {sum(real.values()):,} real images from {data} ({per_class})")
    else:
        lines.append(f"- **Trained on:** {data}")
    if card.get("data_license"):
        lines.append(f"- **Data source and licence:** {card['data_license']}")
    imbalance = _imbalance_words(training)
    if imbalance:
        lines.append(f"- **Rare classes:** {imbalance}")
    threshold = card.get("operating_threshold")
    metrics = card.get("metrics") or {}
    test = metrics.get("test") or {}
    if threshold is not None:
        tm = card.get("threshold_metrics") or {}
        at_test = test.get("at_operating_threshold") or {}
        validated = (f"- **Referral threshold {float(threshold):.3f}:** on the validation images it sent on "
                     f"{percent(tm.get('sensitivity'))} of malignant lesions and cleared "
                     f"{percent(tm.get('specificity'))} of benign ones")
        if at_test:
            ci = test.get("intervals") or {}
            validated += (f"; on the test images {percent(at_test.get('sensitivity'))}"
                          f"{interval_words(ci.get('sensitivity_at_threshold'))} and "
                          f"{percent(at_test.get('specificity'))}{interval_words(ci.get('specificity_at_threshold'))}")
        lines.append(validated)
    for split in ("test", "validation"):
        block = metrics.get(split) or {}
        if isinstance(block.get("malignant_auc"), (int, float)) or isinstance(block.get("balanced_accuracy"),
                                                                               (int, float)):
            # Only the bundle's own numbers: a pruned or re-balanced model's source metrics are never shown here.
            parts, ci = [], block.get("intervals") or {}
            if isinstance(block.get("malignant_auc"), (int, float)):
                parts.append(f"malignant-vs-benign AUC {block['malignant_auc']:.2f}"
                             f"{interval_words(ci.get('malignant_auc'), as_percent=False)}")
            if isinstance(block.get("balanced_accuracy"), (int, float)):
                mean_recall = percent(block["balanced_accuracy"]) + interval_words(ci.get("balanced_accuracy"))
                parts.append(f"mean sensitivity over the classes (balanced accuracy) {mean_recall}")
            lines.append(f"- **Overall ({split}, {block.get('n', '?')} images):** " + ", ".join(parts))
            break
    lines += ["", performance_markdown(card), ""]
    lines.append(f"**Limitations:** {TRAINING_POPULATION} Research use only; not a diagnostic device.")
    inference = card.get("inference") or {}
    technical = [f"{arch.get('name', '?')}" + (" (pruned)" if arch.get("channel_plan") else ""),
                 f"input {card.get('input_size')} px"]
    if (card.get("preprocessing") or {}).get("color_constancy"):
        technical.append("Shades-of-Gray colour constancy")
    if inference.get("tta"):
        technical.append(f"{inference['tta']} views averaged per image")
    int8 = (card.get("export") or {}).get("int8") or {}
    if int8.get("validated"):
        served = (int8.get("parity") or {}).get("served") or int8.get("parity") or {}
        technical.append("runs by default as an 8-bit network that gave the same top diagnosis as the full-precision "
                         f"one on {percent(served.get('top1_agreement'))} of the validation images (the figures above "
                         "are the full-precision network's)")
    lines += ["", f"_Technical: {', '.join(technical)}._"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ notes on the page


def file_types_note(max_file_mb: float, max_megapixels: float) -> str:
    """The files the image tabs accept and their limits, as the upload fields state them."""
    return (f"JPEG, PNG, TIFF, BMP, WebP or single-frame DICOM, at most {max_file_mb:g} MB and "
            f"{max_megapixels:g} megapixels")


def batch_note(n_classified: int, n_sent: int, skipped: Sequence[str]) -> str:
    """The note beside a batch table: how many images were classified, and why each skipped file was skipped."""
    note = f"{n_classified} of {n_sent} images classified."
    if skipped:
        note += "\n\n**Skipped:**\n" + "\n".join(f"- {message}" for message in skipped)
    return note


def privacy_note(output_max_age_s: float) -> str:
    """The page's footer: what happens to uploads and results, and how soon they are deleted."""
    minutes = max(1, round(output_max_age_s / 60))
    return ("_No image, result or usage data leaves this machine. A single uploaded image is deleted from the "
            f"server within a minute of its analysis, batch files and results within {minutes} minutes, and "
            "everything left when the server stops; nothing you upload is written to the server log._")


def explanation_markdown(class_name: str, method: str) -> str:
    """One line on how to read the heat-map of `class_name` (`method`: "gradcam" or "attention")."""
    how = "Grad-CAM" if method == "gradcam" else "attention rollout"
    return (f"**Heat-map for: {class_name}** ({how}). Red marks the regions that most raised the model's score for "
            "this class, blue the regions with little effect. It shows where the model looked, not why; it is not "
            "a lesion border.")


# ------------------------------------------------------------------------------------------------ pathology


def pathology_referral_html(p_malignant: float | None, card: dict[str, Any]) -> str:
    """The headline, as on the image tab: a badge with the referral decision, the malignancy probability against
    the threshold (digits enough that the two never read as equal when they differ) and what the threshold means."""
    decision = referral_decision(p_malignant, card)
    badge = referral_badge(decision)
    if decision == NO_REFERRAL:
        if p_malignant is None:
            text = "This model names no malignant class, so it gives no malignancy probability or referral."
        else:
            text = (f"Malignancy probability {p_malignant:.2f}. This model has no validated referral threshold; "
                    "read the probability with care.")
        return f'{badge}<p class="ll-referral-text">{text}</p>'
    shown_p, shown_t = compare_text(float(p_malignant), float(card["operating_threshold"]))
    n_val = ((card.get("metrics") or {}).get("validation") or {}).get("n")
    cases = f"the {n_val} validation images" if n_val else "the validation images"
    side = "at or above" if decision == REFER else "below"
    meaning = threshold_meaning(decision, card, cases, "cases", "there, and was validated on few cases, so a case "
                                "that worries you clinically still needs a pathologist's review.")
    text = (f"Malignancy probability <b>{shown_p}</b> is {side} the referral threshold {shown_t}. "
            f"{meaning}")
    return f'{badge}<p class="ll-referral-text">{text}</p>'


def case_note_markdown(n_patches: int, n_tissue_patches: int, p_malignant: float | None, card: dict[str, Any],
                       n_warnings: int = 0) -> str:
    """The note beside a pathology case's prediction: what was analysed, how to read the heat-map, the referral."""
    analysed = f"**{n_patches} tissue patch{'es' if n_patches != 1 else ''}** analysed"
    if n_tissue_patches > n_patches:
        analysed += f" (a fixed random sample of the case's {n_tissue_patches:,})"
    lines = [
        f"{analysed}; attention sums to 1 over them (heat-map: blue = lowest, red = highest attention in this case; "
        "grey = background or not analysed).",
        referral_markdown(p_malignant, card),
    ]
    if n_warnings:
        lines.append(f"**{n_warnings} warning{'s' if n_warnings > 1 else ''}** (above).")
    lines.append("_Research prototype: not a diagnosis._")
    return "  \n".join(lines)


def pathology_card_markdown(name: str, card: dict[str, Any]) -> str:
    """The clinical card of a MIL bundle: what it does, what it learnt from, how well it did, its limits. No paths."""
    lines = [f"### Model card: {name}", ""]
    lines.append(f"- **Version:** {card.get('model_version') or 'not recorded'}")
    if card.get("description"):
        lines.append(f"- **What it does:** {card['description']}")
    lines.append(f"- **Classifies into:** {', '.join(card.get('class_names') or [])}"
                 + (f" (counted as malignant: {', '.join(card['malignant_classes'])})"
                    if card.get("malignant_classes") else ""))
    counts = card.get("data_counts") or {}
    train = counts.get("train") or (card.get("training") or {}).get("train_counts") or {}
    if train:
        per_class = ", ".join(f"{c} {n}" for c, n in train.items())
        lines.append(f"- **Trained on:** {sum(train.values())} images ({per_class})")
    if card.get("data_source"):
        lines.append(f"- **Data source:** {card['data_source']}")
    if card.get("data_license"):
        lines.append(f"- **Licence:** {card['data_license']}")
    metrics = card.get("metrics") or {}
    threshold = card.get("operating_threshold")
    if threshold is not None:
        tm = card.get("threshold_metrics") or {}
        val_n = (metrics.get("validation") or {}).get("n", "?")
        text = (f"- **Referral threshold {float(threshold):.3f}:** on the {val_n} validation images it sent on "
                f"{percent(tm.get('sensitivity'))} of malignant cases and cleared {percent(tm.get('specificity'))} "
                "of benign ones")
        at_test = (metrics.get("test") or {}).get("at_operating_threshold") or {}
        if at_test:
            text += (f"; on the {metrics['test'].get('n', '?')} test images {percent(at_test.get('sensitivity'))} "
                     f"and {percent(at_test.get('specificity'))}")
        lines.append(text)
    test = metrics.get("test") or {}
    if isinstance(test.get("malignant_auc"), (int, float)):
        lines.append(f"- **Overall (test, {test.get('n', '?')} images):** malignant-vs-benign AUC "
                     f"{test['malignant_auc']:.2f}, accuracy {percent(test.get('accuracy'))}")
    calibration = card.get("calibration") or {}
    if calibration.get("method") in (None, "none"):
        lines.append("- **Calibration:** none (too few validation images); treat probabilities as scores")
    limitations = card.get("limitations") or ["Research use only; not a diagnostic device."]
    lines += ["", "**Limitations:**", *[f"- {item}" for item in limitations]]
    return "\n".join(lines)
