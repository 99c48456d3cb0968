"""Static int8 quantization settings for a bundle's ONNX export, each against eager on validation images.

    .venv/bin/python benchmarks/int8_trials.py --bundle models/default_bundle --manifest runs/ship_prune/manifest.csv \
        minmax percentile minmax_excl_depthwise minmax_excl_first_last > int8_trials.jsonl
    .venv/bin/python benchmarks/int8_trials.py --bundle models/default_bundle --manifest runs/ship_prune/manifest.csv \
        --served minmax excl:block0 excl:block0+head >> int8_trials.jsonl

Each trial quantizes the bundle's `model.onnx` (QDQ, per-channel int8 weights, uint8 activations, calibrated on 256
training images of the manifest, as `lesionlab export --int8` does) with one change, and prints one JSON line with
the parity that `lesionlab export` records (top-1 agreement and malignant-AUC change against eager on 256
validation images; one view, uncalibrated softmax; `--split test`: all test images instead, to report a setting
chosen on validation). The export's rule: agreement >= 0.99 and |AUC change| <= 0.005.

`first:K` keeps the first K convolutions (and the clip after each) in float, as `lesionlab export --int8
--int8-keep-float K` does; `excl:G1+G2` keeps those of the named groups in float: `stem`, `block0` ... `block15`
(the MBConv blocks in order), `head` (the last 1x1 convolution and the linear layer). `--served` adds (under
`served`) the parity of the probabilities as the predictor serves them (the card's test-time views, each
calibrated, averaged), which the export's rule judges.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conv_groups(graph) -> dict[str, list[str]]:
    """Node names per group: `stem`, `block<i>`, `head`; each convolution with the Clip that reads its output."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    groups: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        weight = node.input[1]
        block = re.search(r"_blocks\.\d+\.(\d+)\.", weight)
        key = f"block{block.group(1)}" if block else "stem" if "stem" in weight else "head"
        clips = [r.name for r in readers.get(node.output[0], []) if r.op_type == "Clip"]
        groups.setdefault(key, []).extend([node.name, *clips])
    return groups


def test_images(bundle, manifest: str) -> tuple[list, object]:
    """The manifest's real test images, preprocessed as the bundle does, in batches of 16, and their labels."""
    import numpy as np

    from pipelines.export import _image_batches
    from pipelines.manifest import read_manifest
    from pipelines.transforms import card_transform

    table = read_manifest(manifest)
    test = table[(table.split == "test") & (table.source == "real")]
    labels = np.array([bundle.class_names.index(c) for c in test.label])
    return list(_image_batches(list(test.path), card_transform(bundle.card))), labels


def main() -> None:
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from models.bundle import load_bundle
    from pipelines.export import ONNX_FILE, OnnxNet, _parity, _parity_images, _views, float_nodes, quantize_prepared
    from pipelines.transforms import card_tta

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--manifest", required=True, help="the bundle's own manifest")
    parser.add_argument("--served", action="store_true", help="also measure the served (test-time views) parity")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="parity on 256 validation images (choosing settings) or on the whole test split")
    parser.add_argument("trials", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    model = bundle.model.eval()
    val, labels, train = _parity_images(bundle, args.manifest, 256, 256)
    if args.split == "test":
        val, labels = test_images(bundle, args.manifest)
    scratch = Path(tempfile.mkdtemp())
    prepared = scratch / "prepared.onnx"
    quant_pre_process(str(Path(args.bundle) / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    linear = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    groups = conv_groups(graph)
    trials = {
        "minmax": {},
        "percentile": {"calibrate_method": CalibrationMethod.Percentile},
        "entropy": {"calibrate_method": CalibrationMethod.Entropy},
        "minmax_excl_depthwise": {"nodes_to_exclude": depthwise},
        "minmax_excl_first_last": {"nodes_to_exclude": [convs[0].name, *linear]},
    }
    for name in args.trials:
        if name.startswith("first:") and name[6:].isdigit():  # the export's --int8-keep-float K
            trials[name] = {"nodes_to_exclude": float_nodes(graph, int(name[6:]))}
        elif name.startswith("excl:"):
            unknown = [g for g in name[5:].split("+") if g not in groups]
            if unknown:
                parser.error(f"trial '{name}': unknown groups {unknown}; expected some of {sorted(groups)}")
            trials[name] = {"nodes_to_exclude": [n for g in name[5:].split("+") for n in groups[g]]}
        elif name not in trials:
            parser.error(f"unknown trial '{name}'; expected one of {sorted(trials)} excl:GROUP[+GROUP...] or first:K")
    views = card_tta(bundle.card) if args.served else 1
    eager = _views(model, val, views)

    for name in args.trials:
        started = time.time()
        out = scratch / f"{name.replace(':', '_').replace('+', '_')}.onnx"
        quantize_prepared(prepared, out, train, **trials[name])  # the export's settings, with the trial's change
        net = OnnxNet(out)
        parity = _parity(eager, _views(lambda x, net=net: net(x)[0], val, views), labels, bundle.class_names,
                         bundle.malignant_classes, bundle.card.get("calibration"))
        print(json.dumps({"trial": name, "seconds": round(time.time() - started), **parity}), flush=True)


if __name__ == "__main__":
    main()
