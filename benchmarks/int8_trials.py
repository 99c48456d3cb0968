"""Static int8 quantization settings for a bundle's ONNX export, each against eager on validation images.

    .venv/bin/python benchmarks/int8_trials.py --bundle models/default_bundle --manifest runs/ship_prune/manifest.csv \
        minmax percentile entropy minmax_excl_depthwise minmax_excl_first_last > int8_trials.jsonl

Each trial quantizes the bundle's `model.onnx` (QDQ, per-channel int8 weights, uint8 activations, calibrated on 256
training images of the manifest, as `lesionlab export --int8` does) with one change, and prints one JSON line with
the parity that `lesionlab export` records (top-1 agreement and malignant-AUC change against eager on 256
validation images, one view, uncalibrated softmax). The export's rule: agreement >= 0.99 and |AUC change| <= 0.005.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import onnx
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from models.bundle import load_bundle
    from pipelines.export import ONNX_FILE, OnnxNet, _compare, _parity_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--manifest", required=True, help="the bundle's own manifest")
    parser.add_argument("trials", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    model = bundle.model.eval()
    val, labels, train = _parity_images(bundle, args.manifest, 256, 256)
    scratch = Path(tempfile.mkdtemp())
    prepared = scratch / "prepared.onnx"
    quant_pre_process(str(Path(args.bundle) / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    linear = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    trials = {
        "minmax": {},
        "percentile": {"calibrate_method": CalibrationMethod.Percentile},
        "entropy": {"calibrate_method": CalibrationMethod.Entropy},
        "minmax_excl_depthwise": {"nodes_to_exclude": depthwise},
        "minmax_excl_first_last": {"nodes_to_exclude": [convs[0].name, *linear]},
    }

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": batch.numpy()} for batch in train])

        def get_next(self):
            return next(self.items, None)

    for name in args.trials:
        started = time.time()
        out = scratch / f"{name}.onnx"
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **trials[name])
        parity = _compare(model, OnnxNet(out), val, labels, bundle.class_names, bundle.malignant_classes)
        print(json.dumps({"trial": name, "seconds": round(time.time() - started), **parity}), flush=True)


if __name__ == "__main__":
    main()
