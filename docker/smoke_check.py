"""Host-side checks for scripts/docker_smoke.sh: a small bundle, the predict CSV, the container's API against it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("docker_smoke")

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def make_bundle(folder: Path, seed: int = 0) -> Path:
    """Save a seeded small-CNN bundle with a realistic card (the smoke run's mounted model; no downloads)."""
    import torch

    from models.bundle import save_bundle
    from models.registry import build_model, default_normalization

    torch.manual_seed(seed)
    model = build_model("small-cnn", num_classes=len(HAM_CLASSES), img_size=64, widths=[8, 16, 32]).eval()
    with torch.no_grad():
        model.head.weight.mul_(20.0)  # spread the probabilities so that a preprocessing difference would show
    card = {
        "architecture": {"name": "small-cnn", "kwargs": {"widths": [8, 16, 32]}},
        "class_names": HAM_CLASSES,
        "malignant_classes": ["mel", "bcc", "akiec"],
        "input_size": 64,
        "normalization": default_normalization("small-cnn"),
        "operating_threshold": 0.3,
        "threshold_metrics": {"sensitivity": 0.9, "specificity": 0.6, "threshold": 0.3},
        "metrics": {},
        "task": "image",
    }
    return save_bundle(folder, model, card)


def read_predictions(csv_path: Path) -> dict[str, dict[str, float | str]]:
    """A `lesionlab predict` CSV as {image_id: row}."""
    import pandas as pd

    table = pd.read_csv(csv_path)
    return {str(row["image_id"]): row for row in table.to_dict("records")}


def check_csv(csv_path: Path, images: Path) -> dict[str, dict[str, float | str]]:
    """Check that the CSV has one row per image, the expected columns and probabilities summing to one."""
    if not csv_path.is_file():
        raise AssertionError(f"prediction CSV '{csv_path}' was not written")
    rows = read_predictions(csv_path)
    expected = sorted(p.stem for p in images.iterdir() if p.is_file())
    if sorted(rows) != expected:
        raise AssertionError(f"CSV image_ids {sorted(rows)} differ from the images given {expected}")
    for image_id, row in rows.items():
        probs = {k: float(v) for k, v in row.items() if k.startswith("prob_") and k != "prob_malignant"}
        if not probs or "pred_label" not in row:
            raise AssertionError(f"CSV row {image_id} lacks pred_label or prob_<class> columns: {sorted(row)}")
        if abs(sum(probs.values()) - 1.0) > 1e-3:
            raise AssertionError(f"CSV row {image_id}: class probabilities sum to {sum(probs.values()):.4f}, not 1")
        if row["pred_label"] != max(probs, key=probs.get).removeprefix("prob_"):
            raise AssertionError(f"CSV row {image_id}: pred_label {row['pred_label']} is not the most probable class")
    log.info("CSV %s: %d rows, columns ok", csv_path, len(rows))
    return rows


def compare_csvs(first: Path, second: Path, tolerance: float) -> float:
    """Largest absolute difference between the probability columns of two prediction CSVs (same rows required)."""
    a, b = read_predictions(first), read_predictions(second)
    if sorted(a) != sorted(b):
        raise AssertionError(f"{first} and {second} hold different images: {sorted(a)} vs {sorted(b)}")
    worst = 0.0
    for image_id, row in a.items():
        for key, value in row.items():
            if key.startswith("prob_"):
                worst = max(worst, abs(float(value) - float(b[image_id][key])))
        if row["pred_label"] != b[image_id]["pred_label"]:
            raise AssertionError(f"{image_id}: pred_label {row['pred_label']} in {first}, "
                                 f"{b[image_id]['pred_label']} in {second}")
    if worst > tolerance:
        raise AssertionError(f"{first} and {second} differ by {worst:.2e} (tolerance {tolerance:.0e})")
    return worst


def wait_http(url: str, timeout_s: float) -> float:
    """Poll `url` until it answers 200; return the seconds waited."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    body = response.read(200_000).decode("utf-8", "replace")
                    if "gradio" not in body.lower():
                        raise AssertionError(f"{url} answered 200 but the page does not look like the Gradio app")
                    return time.monotonic() - start
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s (last: {last})")


def compare_api(url: str, csv_path: Path, images: Path, model: str, tolerance: float) -> dict[str, float]:
    """Call the served API (single and batch) on every image and compare with the `lesionlab predict` CSV."""
    from gradio_client import Client, handle_file

    expected = read_predictions(csv_path)
    client = Client(url, verbose=False)
    timings: dict[str, float] = {}
    worst = 0.0
    paths = sorted(p for p in images.iterdir() if p.is_file())
    start = time.monotonic()
    for path in paths:
        outputs = client.predict(handle_file(str(path)), model, api_name="/classify")
        details = outputs[-1]  # the JSON details: full-precision probabilities keyed by class code
        row = expected[path.stem]
        if details["predicted"] != row["pred_label"]:
            raise AssertionError(f"{path.name}: API says {details['predicted']}, "
                                 f"`lesionlab predict` says {row['pred_label']}")
        for cls, prob in details["probabilities"].items():
            worst = max(worst, abs(float(prob) - float(row[f"prob_{cls}"])))
        worst = max(worst, abs(float(details["prob_malignant"]) - float(row["prob_malignant"])))
    timings["api_single_s_per_image"] = (time.monotonic() - start) / len(paths)
    start = time.monotonic()
    table, batch_csv, _note = client.predict([handle_file(str(p)) for p in paths], model, api_name="/classify_batch")
    timings["api_batch_s"] = time.monotonic() - start
    worst = max(worst, compare_csvs(Path(batch_csv), csv_path, tolerance))
    if worst > tolerance:
        raise AssertionError(f"API probabilities differ from `lesionlab predict` by {worst:.2e} "
                             f"(tolerance {tolerance})")
    timings["max_abs_diff"] = worst
    log.info("API at %s matches the predict CSV on %d images (max |diff| %.2e)", url, len(paths), worst)
    return timings


def main(argv: list[str] | None = None) -> int:
    """Command line for the smoke script."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-bundle")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("check-csv")
    p.add_argument("csv", type=Path)
    p.add_argument("images", type=Path)
    p = sub.add_parser("compare-csv")
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p = sub.add_parser("wait-http")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=240.0)
    p = sub.add_parser("compare-api")
    p.add_argument("url")
    p.add_argument("csv", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[docker_smoke] %(message)s")
    try:
        if args.command == "make-bundle":
            print(make_bundle(args.folder))
        elif args.command == "check-csv":
            check_csv(args.csv, args.images)
        elif args.command == "compare-csv":
            print(f"{compare_csvs(args.first, args.second, args.tolerance):.3e}")
        elif args.command == "wait-http":
            print(f"{wait_http(args.url, args.timeout):.1f}")
        else:
            print(json.dumps(compare_api(args.url, args.csv, args.images, args.model, args.tolerance)))
    except AssertionError as err:
        log.error("FAILED: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
