"""Fit a bundle's out-of-distribution score on its own HAM10000 split and measure it on the test split and on
images that are clearly not dermoscopy.

    python benchmarks/fit_ood.py --data ../shared/data/ham10000 --bundle models/default_bundle \\
        --ucsb ../shared/data/ucsb_breast --out benchmarks/results/ood

The bundle's manifest is re-created with the library's ingest and grouped split (val 0.15, test 0.15, seed 0, as
benchmarks/train_ham10000.py) and must hash to the card's `manifest_sha256`; otherwise the script refuses. The score
(Mahalanobis on the head's input features, pipelines/ood.py) is fitted on a stratified subsample of the real training
images and thresholded at a percentile of the validation scores; the card gains its `ood` block and the bundle an
`ood.safetensors` (nothing else changes). The test split, never used for fitting, gives the in-distribution false
alarm rate; the out-of-distribution sets are built here: UCSB H&E microscopy, uniform grey and random-noise images,
synthetic screenshots, the photographs and other medical images that ship with scikit-image and scikit-learn, and
test images with a colour cast, heavy noise, no colour or shrunk to 128 px. Each image's features come from one
forward of the bundle's own transform and network; the written score, the other feature normalization and the energy
score are all computed from them, and the first `--check-n` images are re-scored through
`Predictor.predict_with_ood` (the serving path), which must agree. Writes the record (summary and one row per image)
to `<out>/ood.json`.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.bundle import load_bundle, read_card, write_ood
from pipelines.data import ImageDataset
from pipelines.images import ImageLimits, load_image
from pipelines.manifest import grouped_split, ingest_ham10000, manifest_sha256, read_manifest, write_manifest
from pipelines.ood import (
    DEFAULT_PERCENTILE,
    MAX_TRAIN_IMAGES,
    dataset_features,
    first_view_features,
    fit_ood,
    head_inputs,
    stratified_subsample,
)
from pipelines.prediction import Predictor
from pipelines.transforms import card_transform

log = logging.getLogger("fit_ood")

SAMPLE_PICTURES = {  # (package, file): what it shows
    ("skimage", "astronaut.png"): "photograph of a person",
    ("skimage", "chelsea.png"): "photograph of a cat",
    ("skimage", "coffee.png"): "photograph of a coffee cup",
    ("skimage", "rocket.jpg"): "photograph of a rocket launch",
    ("skimage", "motorcycle_left.png"): "photograph of a motorcycle",
    ("skimage", "hubble_deep_field.jpg"): "telescope image",
    ("skimage", "camera.png"): "greyscale photograph",
    ("skimage", "retina.jpg"): "fundus photograph",
    ("skimage", "ihc.png"): "immunohistochemistry microscopy",
    ("skimage", "cell.png"): "greyscale cell microscopy",
    ("skimage", "page.png"): "scanned text page",
    ("skimage", "brick.png"): "brick wall texture",
    ("skimage", "grass.png"): "grass texture",
    ("sklearn", "china.jpg"): "photograph of a temple",
    ("sklearn", "flower.jpg"): "photograph of a flower",
}


def recreate_manifest(data: Path, folder: Path, expected: str | None) -> Path:
    """The bundle's manifest from the library's ingest + grouped split; refuses when it does not hash as the card."""
    df = grouped_split(ingest_ham10000(data), val_fraction=0.15, test_fraction=0.15, seed=0)
    path = write_manifest(df, folder / "manifest.csv")
    digest = manifest_sha256(path)
    if expected is None:
        raise SystemExit("the bundle's card records no manifest_sha256; its split cannot be re-created safely")
    if digest != expected:
        raise SystemExit(f"the re-created manifest hashes to {digest}, the bundle's card records {expected}: "
                         f"'{data}' is not the data (or split) this bundle was trained on; refusing to fit")
    log.info("manifest re-created: %d rows, sha256 %s matches the card", len(df), digest)
    return path


def sample_pictures(rng: np.random.Generator, crops: int) -> list[tuple[str, str, Image.Image]]:
    """(set, name, image): every bundled sample picture whole and as `crops` random square crops."""
    import importlib

    out = []
    for (package, name), _ in SAMPLE_PICTURES.items():
        module = importlib.import_module("skimage.data" if package == "skimage" else "sklearn.datasets")
        folder = Path(module.__file__).parent / ("" if package == "skimage" else "images")
        image = Image.open(folder / name).convert("RGB")
        out.append(("photos_and_other_images", f"{package}:{name}", image))
        width, height = image.size
        for i in range(crops):
            side = int(min(width, height) * rng.uniform(0.4, 0.8))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            out.append(("photos_and_other_images", f"{package}:{name}#crop{i}",
                        image.crop((left, top, left + side, top + side))))
    return out


def screenshot(rng: np.random.Generator, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A synthetic application screenshot: a light background, a title bar, coloured panels and lines of text."""
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, size[0], 40), fill=tuple(int(v) for v in rng.integers(0, 120, 3)))
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, size[0] - 200)), int(rng.integers(50, size[1] - 120))
        draw.rectangle((x0, y0, x0 + int(rng.integers(100, 300)), y0 + int(rng.integers(40, 150))),
                       fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for line in range(int(rng.integers(8, 20))):
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(2, 9))))
                         for _ in range(int(rng.integers(4, 12))))
        draw.text((20, 60 + 25 * line), words, fill=(20, 20, 20))
    return image


def shifted(image: Image.Image, kind: str, rng: np.random.Generator, index: int) -> Image.Image:
    """A dermoscopy image with a strong colour cast, heavy Gaussian noise (sigma 50), its colour removed, or shrunk to
    128 x 128 px and saved as JPEG (quality 90) as the embedded sample was (benchmarks/make_sample.py)."""
    if kind == "downscaled_128":
        buffer = io.BytesIO()
        image.resize((128, 128), Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=90)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    array = np.asarray(image, dtype=np.float32)
    if kind == "colour_cast":
        gains = (1.0, 0.55, 0.3) if index % 2 == 0 else (0.35, 0.6, 1.0)  # orange / blue
        array = array * np.asarray(gains, dtype=np.float32)
    elif kind == "gaussian_noise":
        array = array + rng.normal(0.0, 50.0, array.shape)
    elif kind == "greyscale":
        return image.convert("L").convert("RGB")
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


@torch.inference_mode()
def image_features(predictor: Predictor, items: list[tuple[str, str, Callable[[], Image.Image]]],
                   batch: int) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) head-input features, (N, C) logits) of the un-augmented evaluation crop of each image, as the
    predictor's own transform and network compute them (each image is made when needed)."""
    model, transform = predictor.members[0].model, predictor.members[0].transform
    features, logits = [], []
    for start in range(0, len(items), batch):
        chunk = torch.stack([transform(make()) for _, _, make in items[start : start + batch]])
        with head_inputs(model) as captured:
            logits.append(model(chunk.contiguous(memory_format=predictor.members[0].layout)).float().numpy())
        features.append(first_view_features(captured, len(chunk)))
    return np.concatenate(features), np.concatenate(logits)


def summarise(rows: list[dict], variants: list[str]) -> dict[str, dict]:
    """Per variant and set: images, share flagged, score quantiles."""
    summary: dict[str, dict] = {}
    for variant in variants:
        summary[variant] = {}
        for group in dict.fromkeys(r["set"] for r in rows):
            scores = np.array([r[f"score_{variant}"] for r in rows if r["set"] == group])
            flagged = np.array([r[f"flagged_{variant}"] for r in rows if r["set"] == group])
            summary[variant][group] = {
                "n": int(len(scores)), "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
                "score_p5": float(np.percentile(scores, 5)), "score_median": float(np.median(scores)),
                "score_p95": float(np.percentile(scores, 95))}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="HAM10000 folder: metadata.csv + images/")
    parser.add_argument("--bundle", type=Path, required=True, help="the single-network bundle to fit")
    parser.add_argument("--ucsb", type=Path, default=None, help="UCSB breast H&E folder (images/); optional")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ood"))
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    parser.add_argument("--normalization", default="l2", choices=["l2", "none"],
                        help="feature normalization of the written score (the other one is measured too)")
    parser.add_argument("--check-n", type=int, default=64, help="images re-scored through Predictor.predict_with_ood")
    parser.add_argument("--train-max", type=int, default=MAX_TRAIN_IMAGES, help="training images for the fit")
    parser.add_argument("--test-max", type=int, default=0, help="test images to score (0: all)")
    parser.add_argument("--shifted-n", type=int, default=50, help="test images per shifted-dermoscopy set")
    parser.add_argument("--synthetic-n", type=int, default=40, help="images per grey / noise / screenshot set")
    parser.add_argument("--crops", type=int, default=2, help="random crops per bundled sample picture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="measure only; leave the bundle as it is")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    card = read_card(args.bundle)
    with tempfile.TemporaryDirectory() as folder:
        manifest = read_manifest(recreate_manifest(args.data, Path(folder), card.get("manifest_sha256")))
    bundle = load_bundle(args.bundle)
    class_names, transform = bundle.class_names, card_transform(bundle.card)
    real = manifest[manifest.source == "real"]
    train = real[real.split == "train"]
    train = train.iloc[stratified_subsample(train.label.to_numpy(), args.train_max, args.seed)]
    val, test = real[real.split == "val"], real[real.split == "test"]
    if args.test_max and len(test) > args.test_max:
        test = test.iloc[np.sort(rng.choice(len(test), args.test_max, replace=False))]

    t0 = time.perf_counter()
    train_features, _, train_labels = dataset_features(bundle.model, ImageDataset(train, class_names, transform),
                                                       args.batch_size, "features (train)")
    val_features, val_logits, _ = dataset_features(bundle.model, ImageDataset(val, class_names, transform),
                                                   args.batch_size, "features (validation)")
    fitted_on = (f"{len(train)} real training images (stratified subsample of at most {args.train_max}) for the "
                 f"class means and covariance; the validation split ({len(val)} images) for the threshold; "
                 f"manifest sha256 {card['manifest_sha256'][:12]}")
    detector = fit_ood(train_features, train_labels, val_features, args.percentile, fitted_on=fitted_on,
                       normalization=args.normalization)
    fit_seconds = time.perf_counter() - t0
    # The other variants, from the same features, for the comparison only (not written to the bundle).
    variants = {
        f"mahalanobis_{args.normalization}": detector,
        "mahalanobis_" + ("none" if args.normalization == "l2" else "l2"): fit_ood(
            train_features, train_labels, val_features, args.percentile,
            normalization="none" if args.normalization == "l2" else "l2"),
        "energy": fit_ood(train_features, train_labels, val_features, args.percentile, "energy", val_logits),
    }
    detector.block["fit_seconds"] = round(fit_seconds, 1)
    log.info("fitted in %.0f s: threshold %.3f", fit_seconds, detector.threshold)

    if args.no_write:
        target = Path(tempfile.mkdtemp(prefix="ood-bundle-"))
        import shutil

        shutil.copytree(args.bundle, target, dirs_exist_ok=True)
    else:
        target = args.bundle
    write_ood(target, detector.block, detector.torch_tensors())
    for name in ("card.json", "ood.safetensors"):  # readable like the bundle's other files (a temp file is 0600)
        (target / name).chmod(0o644)
    predictor = Predictor(load_bundle(target), tta=1, batch_size=args.batch_size)  # the score reads view 1 only

    limits = ImageLimits(min_side=8)
    load = partial(load_image, limits=limits)
    items: list[tuple[str, str, Callable[[], Image.Image]]] = []
    paths = dict(zip(test.image_id, test.path, strict=True))
    items += [("ham10000_test", name, partial(load, path)) for name, path in paths.items()]
    for kind in ("colour_cast", "gaussian_noise", "greyscale", "downscaled_128"):
        for i, name in enumerate(list(paths)[: args.shifted_n]):
            noise = np.random.default_rng([args.seed, i])
            items.append((kind, name, lambda p=paths[name], k=kind, n=noise, j=i: shifted(load(p), k, n, j)))
    if args.ucsb is not None:
        items += [("ucsb_he", p.name, partial(load, p)) for p in sorted((args.ucsb / "images").glob("*.jpg"))]
    levels = np.linspace(10, 245, args.synthetic_n)
    items += [("uniform_grey", f"grey{int(v)}", partial(Image.new, "RGB", (600, 450), (int(v),) * 3))
              for v in levels]
    noise_images = [rng.integers(0, 256, (450, 600, 3), dtype=np.uint8) for _ in range(args.synthetic_n)]
    items += [("random_noise", f"noise{i}", partial(Image.fromarray, array)) for i, array in enumerate(noise_images)]
    screens = [screenshot(rng) for _ in range(args.synthetic_n)]
    items += [("screenshot", f"screen{i}", lambda s=s: s) for i, s in enumerate(screens)]
    items += [(group, name, lambda im=im: im) for group, name, im in sample_pictures(rng, args.crops)]
    t1 = time.perf_counter()
    features, logits = image_features(predictor, items, args.batch_size)
    score_seconds = time.perf_counter() - t1
    scores = {name: variant.score(features, logits) for name, variant in variants.items()}
    rows = [{"set": group, "image": name} for group, name, _ in items]
    for name, variant in variants.items():
        for row, score, flag in zip(rows, scores[name], variant.flags(scores[name]), strict=True):
            row[f"score_{name}"], row[f"flagged_{name}"] = float(score), bool(flag)
    # The serving path (Predictor.predict_with_ood on the written bundle) must give the same scores.
    check = items[: args.check_n]
    served = predictor.predict_with_ood([make() for _, _, make in check])[1]
    served_gap = float(np.max(np.abs(served - scores[f"mahalanobis_{args.normalization}"][: len(check)])))
    if served_gap > 1e-3 * detector.threshold:
        raise SystemExit(f"the serving path's scores differ from the measured ones by {served_gap}")

    summary = summarise(rows, list(variants))
    record = {
        "study": "ood",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, torch threads {args.threads}",
        "command": "python benchmarks/fit_ood.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v not in (None, False)),
        "bundle": str(args.bundle),
        "written_to_bundle": not args.no_write,
        "ood_block": detector.block,
        "written_variant": f"mahalanobis_{args.normalization}",
        "variant_thresholds": {name: variant.threshold for name, variant in variants.items()},
        "serving_path_check": {"images": len(check), "max_abs_difference": served_gap},
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "wall_seconds": time.perf_counter() - started,
        "summary": summary,
        "sample_pictures": {f"{p}:{n}": what for (p, n), what in SAMPLE_PICTURES.items()},
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ood.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k not in ("rows", "ood_block")}, indent=2))


if __name__ == "__main__":
    main()
