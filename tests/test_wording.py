"""The clinician's wording: the referral headline, capped probabilities, the clinical model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.wording import (
    BELOW,
    NO_REFERRAL,
    REFER,
    card_markdown,
    compare_text,
    performance_markdown,
    probabilities_markdown,
    probability_text,
    referral_decision,
    referral_html,
)

ROOT = Path(__file__).resolve().parent.parent
CARD = {"operating_threshold": 0.3, "malignant_classes": ["mel", "bcc"],
        "threshold_metrics": {"sensitivity": 0.9, "specificity": 0.62}}


@pytest.mark.parametrize(("p", "shown"), [(1.0, "> 99 %"), (0.9991, "> 99 %"), (0.99, "99 %"), (0.674, "67 %"),
                                          (0.01, "1 %"), (0.004, "< 1 %"), (0.0, "< 1 %")])
def test_probabilities_are_rounded_and_capped(p, shown):
    assert probability_text(p) == shown


def test_probability_table_is_sorted_with_full_names():
    table = probabilities_markdown({"nv": 0.2, "mel": 0.7999, "df": 0.0001})
    rows = table.splitlines()[2:]
    assert rows == ["| melanoma (mel) | 80 % |", "| melanocytic nevus (nv) | 20 % |", "| dermatofibroma (df) | < 1 % |"]


@pytest.mark.parametrize(("p", "threshold"), [(0.2979, 0.2981), (0.29801, 0.29799), (0.3, 0.30000001)])
def test_a_probability_and_its_threshold_never_print_the_same(p, threshold):
    shown_p, shown_t = compare_text(p, threshold)
    assert shown_p != shown_t
    assert (p >= threshold) == (float(shown_p) >= float(shown_t))


def test_referral_headline_above_below_and_without_threshold():
    above = referral_html(0.31, CARD)
    assert REFER in above and 'data-decision="refer"' in above and "0.31" in above
    assert "sent on 90 % of malignant lesions" in above and "cleared 62 % of benign ones" in above
    below = referral_html(0.2981, {**CARD, "operating_threshold": 0.2982})
    assert BELOW in below and 'data-decision="below"' in below and "0.2981" in below and "0.2982" in below
    assert "missed 10 % of malignant lesions" in below
    assert referral_decision(0.3, CARD) == REFER  # at the threshold counts as above, as in validation
    assert referral_decision(0.5, {**CARD, "operating_threshold": None}) == NO_REFERRAL
    assert "no malignancy probability" in referral_html(float("nan"), {"malignant_classes": []})
    assert "<script>" not in referral_html(0.5, {**CARD, "malignant_classes": ["<script>"]})


def test_default_bundle_card_reads_as_a_clinical_card():
    card = json.loads((ROOT / "models" / "default_bundle" / "card.json").read_text())
    text = card_markdown("default_bundle", card)
    assert f"**Version:** {card['model_version']}" in text
    assert "melanoma 351" in text and "4,274 real images" in text and "CC BY-NC 4.0" in text
    assert "mostly light-skinned" in text and "not validated on darker skin" in text and "Research use only" in text
    assert "Calibration" in text and "temperature scaling" in text
    for jargon in ("class_weighting", "sampler sqrt", "loss ce", "../", "/work"):
        assert jargon not in text
    # Melanoma's sensitivity is the first one named.
    performance = performance_markdown(card)
    assert performance.index("melanoma") < performance.index("basal cell carcinoma") < performance.index("nevus")


def test_card_never_shows_a_server_path():
    card = {"class_names": ["mel", "nv"], "training": {"data": "/srv/hospital/private/ham10000"}}
    text = card_markdown("m", card)
    assert "/srv" not in text and "ham10000" in text and "**Version:** not recorded" in text


def test_extreme_shapes_and_tiny_images_get_a_warning_not_a_refusal():
    from app.wording import scope_warnings, warnings_html

    assert scope_warnings(600, 450, 224) == []
    strip = scope_warnings(10_000, 40, 224)
    assert len(strip) == 2 and "250 times wider than it is tall" in strip[0] and "small (10000 x 40 px)" in strip[1]
    assert "taller" in scope_warnings(100, 400, 64)[0]
    assert "ll-warning" in warnings_html(strip) and warnings_html([]) == ""


def test_the_card_says_when_a_validated_8_bit_network_serves_and_whose_figures_are_shown():
    card = {"class_names": ["mel", "nv"], "export": {"int8": {"validated": False,
                                                               "parity": {"served": {"top1_agreement": 0.9}}}}}
    assert "8-bit" not in card_markdown("m", card)
    card["export"]["int8"].update(validated=True, parity={"top1_agreement": 0.98, "served": {"top1_agreement": 0.994}})
    text = card_markdown("m", card)
    assert "8-bit network" in text and "on 99 % of the validation images" in text
    assert "full-precision network's" in text
