"""Does the heat-map point at the lesion? The shipped explainer against the previous set-up, on real images.

For each image the explained class is its true diagnosis. A lesion mask comes from the ABCD stage (pipelines.abcd)
on the crop the model saw. Per image: is the heat-map's maximum inside the mask (pointing game), is the mean heat
inside the mask above the mean outside, and is the maximum at a corner cell of the map. "previous" is the earlier
set-up: MONAI GradCAM on the head BatchNorm (before its ReLU6) with MONAI's default post-processing (which maps
(min, max) to (1, 0)).

    python benchmarks/heatmap_pointing.py --bundle models/default_bundle --data data/ham10000_sample \
        --limit 120 --out benchmarks/results/heatmap_pointing
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.explain import Explainer, _normalise  # noqa: E402
from models.bundle import load_bundle  # noqa: E402
from pipelines.abcd import abcd_descriptors  # noqa: E402


def previous_heatmap(explainer: Explainer, cam, image, class_index: int) -> np.ndarray:
    """The earlier set-up's map over the same crop (same preprocessing as the shipped explainer)."""
    import torch

    crop = explainer.transform.resize_crop(image.convert("RGB"))
    batch = explainer.transform.normalize(np.asarray(crop)).unsqueeze(0)
    with torch.enable_grad():
        return _normalise(cam(batch, class_idx=class_index)[0, 0].detach().numpy())


def score(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    peak = np.unravel_index(int(heat.argmax()), heat.shape)
    side = heat.shape[0]
    corner = min(side // 7, 32)
    at_corner = (peak[0] < corner or peak[0] >= side - corner) and (peak[1] < corner or peak[1] >= side - corner)
    return {
        "peak_in_mask": bool(mask[peak]),
        "inside_above_outside": bool(heat[mask].mean() > heat[~mask].mean()),
        "peak_at_corner": bool(at_corner),
        "inside_mean": float(heat[mask].mean()),
        "outside_mean": float(heat[~mask].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/default_bundle"))
    parser.add_argument("--data", type=Path, default=Path("data/ham10000_sample"),
                        help="a HAM10000-style folder: metadata.csv + images/")
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heatmap_pointing"))
    args = parser.parse_args()

    from monai.visualize import GradCAM
    from PIL import Image

    bundle = load_bundle(args.bundle)
    explainer = Explainer(bundle)
    old_model = copy.deepcopy(explainer.model)
    for param in old_model.parameters():
        param.requires_grad_(True)
    old_cam = GradCAM(nn_module=old_model, target_layers="backbone.net._bn1")  # MONAI's default post-processing
    rows = list(csv.DictReader((args.data / "metadata.csv").open()))[: args.limit]
    results = []
    started = time.perf_counter()
    for row in rows:
        image = Image.open(args.data / "images" / f"{row['image_id']}.jpg").convert("RGB")
        class_index = bundle.class_names.index(row["dx"])
        explanation = explainer.explain(image, class_index)
        mask = np.asarray(abcd_descriptors(explanation.crop)["mask"], dtype=bool)
        if not mask.any() or mask.all():
            continue
        old = previous_heatmap(explainer, old_cam, image, class_index)
        results.append({"image_id": row["image_id"], "dx": row["dx"],
                        "shipped": score(explanation.heatmap, mask), "previous": score(old, mask)})
    summary = {
        which: {key: float(np.mean([r[which][key] for r in results]))
                for key in ("peak_in_mask", "inside_above_outside", "peak_at_corner")}
        for which in ("shipped", "previous")
    }
    record = {
        "study": "heatmap_pointing",
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/heatmap_pointing.py " + " ".join(sys.argv[1:]),
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "bundle": str(args.bundle),
        "model_version": bundle.card.get("model_version"),
        "images_scored": len(results),
        "images_read": len(rows),
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "rows": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pointing.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
