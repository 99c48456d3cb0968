"""ONNX export of a bundle's network (fp32, and int8 by static quantization) and the ONNX Runtime forward that
`pipelines.prediction.Predictor` uses when a bundle carries an exported file.

`lesionlab export --bundle DIR [--data MANIFEST] [--int8]` writes `model.onnx` (and `model.int8.onnx`) into the
bundle and an `export` block into its card: opset, library versions, the SHA-256 of the weights it was exported from
and of each file, and the parity measured against the eager network. The exported graph has two outputs, the logits
and the input of the linear head (the features the out-of-distribution score reads), so nothing the eager path
gives is lost. int8 uses ONNX Runtime's static quantization in QDQ format with per-channel weights, calibrated on
training images of the bundle's own manifest (the first K convolutions may stay in float); it is marked `validated`
(and used by default) only when, on the validation images and as the predictor serves them (the card's test-time
views, calibrated), its top-1 agrees with the eager network on at least 99 % of images and its malignant AUC moves
by at most 0.005.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bundle import ENSEMBLE, WEIGHTS_FILE, load_bundle, read_card, update_card
from pipelines.ood import feature_layer
from pipelines.provenance import file_sha256

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 18
ENGINES = ("auto", "eager", "onnx", "int8")
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_AUC_CHANGE = 0.005


class _LogitsAndFeatures(nn.Module):
    """The network with a second output: the input of its linear head (absent when it has none)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.head = feature_layer(net)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.head is None:
            return (self.net(x),)
        seen: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, seen[0]


def export_onnx(model: nn.Module, path: Path, input_size: int) -> Path:
    """Write `model` (eval mode, CPU) as ONNX with a dynamic batch axis; outputs `logits` (and `features`)."""
    wrapped = _LogitsAndFeatures(model.cpu().eval().to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 3, input_size, input_size)
    outputs = ["logits"] + (["features"] if wrapped.head is not None else [])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".onnx")
    os.close(fd)
    try:
        program = torch.onnx.export(
            wrapped, (example,), input_names=["image"], output_names=outputs, opset_version=OPSET, dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), verbose=False,
        )
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class OnnxNet:
    """An exported network under ONNX Runtime: NCHW float32 in, (logits, features or None) out as tensors."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle ONNX Runtime threads would otherwise spin between runs and take the cores that the next image's
        # preprocessing (PyTorch ops) needs: one-view int8 prediction at 2 threads was slower than at 1 that way.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.has_features = len(self.session.get_outputs()) > 1

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        outputs = self.session.run(None, {"image": x})
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]) if self.has_features else None


def onnx_net_of(bundle_path: Path | None, card: dict[str, Any], engine: str = "auto") -> OnnxNet | None:
    """The ONNX Runtime network a bundle's card says to use, or None for the eager network.

    `auto` takes the validated int8 file, else the fp32 file, else eager; `onnx`/`int8` require that file; `eager`
    never loads one. A file exported from other weights than the bundle's, or changed since, is refused.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    block = card.get("export")
    if engine == "eager" or bundle_path is None:
        return None
    if not block:
        if engine == "auto":
            return None
        raise ValueError(f"bundle '{bundle_path}' has no exported model; run `lesionlab export --bundle "
                         f"{bundle_path}{' --int8' if engine == 'int8' else ''}` first")
    int8 = block.get("int8") or {}
    if engine == "int8" or (engine == "auto" and int8.get("validated")):
        if not int8:
            raise ValueError(f"bundle '{bundle_path}' has no int8 model; run `lesionlab export --bundle "
                             f"{bundle_path} --int8` first")
        entry = int8
    else:
        entry = block["fp32"]
    path = Path(bundle_path) / entry["file"]
    if Path(entry["file"]).name != entry["file"] or not path.is_file():
        raise FileNotFoundError(f"bundle '{bundle_path}': its card lists the exported model '{entry['file']}', "
                                "which is not in the bundle's folder; re-export it or use --engine eager")
    weights = file_sha256(Path(bundle_path) / WEIGHTS_FILE)
    if weights != block.get("weights_sha256"):
        raise ValueError(f"bundle '{bundle_path}': {entry['file']} was exported from other weights than its "
                         f"{WEIGHTS_FILE} (sha256 {str(block.get('weights_sha256'))[:12]}… vs {weights[:12]}…); "
                         f"re-run `lesionlab export --bundle {bundle_path}` or use --engine eager")
    if file_sha256(path) != entry.get("sha256"):
        raise ValueError(f"bundle '{bundle_path}': {entry['file']} changed since it was exported (its sha256 "
                         "differs from the card's); re-run `lesionlab export` or use --engine eager")
    return OnnxNet(path)


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("onnx", "onnxruntime", "torch"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _image_batches(paths: Sequence[str], transform, batch_size: int = 16) -> Iterator[torch.Tensor]:
    from PIL import Image

    for start in range(0, len(paths), batch_size):
        yield torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])


def _views(forward, batches: list[torch.Tensor], tta: int) -> np.ndarray:
    """(N, V, C) logits of `tta` test-time views of each batch (view 0 is the image itself)."""
    from pipelines.transforms import view_logits

    with torch.inference_mode():
        return np.concatenate([view_logits(forward, batch, tta).numpy() for batch in batches])


def _agreement(reference: np.ndarray, probs: np.ndarray, labels: np.ndarray | None,
               malignant_index: list[int]) -> dict[str, Any]:
    """Largest probability difference, top-1 agreement and malignant-AUC change of `probs` against `reference`."""
    from sklearn.metrics import roc_auc_score

    result: dict[str, Any] = {"max_abs_prob_diff": float(np.abs(reference - probs).max()),
                              "top1_agreement": float((reference.argmax(1) == probs.argmax(1)).mean())}
    if labels is not None and malignant_index:
        target = np.isin(labels, malignant_index).astype(int)
        if 0 < target.sum() < len(target):
            before = roc_auc_score(target, reference[:, malignant_index].sum(1))
            after = roc_auc_score(target, probs[:, malignant_index].sum(1))
            result.update(malignant_auc_eager=float(before), malignant_auc_change=float(after - before))
    return result


def _parity(eager: np.ndarray, exported: np.ndarray, labels: np.ndarray | None, class_names: list[str],
            malignant: list[str], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """Parity of an exported network's (N, V, C) logits against the eager network's on the same images: one view
    (uncalibrated softmax) at the top level, and `served` (every view calibrated, then averaged: what the predictor
    returns) when there is more than one view."""
    from pipelines.calibration import calibrated_probs

    index = [class_names.index(c) for c in malignant if c in class_names]
    result = {"images": int(len(eager)),
              **_agreement(calibrated_probs(eager[:, :1], None), calibrated_probs(exported[:, :1], None), labels,
                           index)}
    if eager.shape[1] > 1:
        result["served"] = {"views": int(eager.shape[1]), **_agreement(
            calibrated_probs(eager, calibration), calibrated_probs(exported, calibration), labels, index)}
    return result


def float_nodes(graph: Any, convolutions: int) -> list[str]:
    """The names of the first `convolutions` convolutions of an ONNX graph (in execution order) and of the Clip
    that reads each one's output: the full-resolution layers int8 export may keep in float."""
    convs = [node for node in graph.node if node.op_type == "Conv"][:convolutions]
    outputs = {node.output[0] for node in convs}
    clips = [node.name for node in graph.node if node.op_type == "Clip" and node.input[0] in outputs]
    return [node.name for node in convs] + clips


def quantize_prepared(prepared: Path, out: Path, batches: list[torch.Tensor], **options: Any) -> None:
    """ONNX Runtime static quantization of a pre-processed model with the export's settings (QDQ, per-channel int8
    weights, uint8 activations), calibrated on `batches`; `options` are further `quantize_static` settings
    (`nodes_to_exclude`, `calibrate_method`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": b.numpy()} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **options)


def _quantize_int8(fp32: Path, out: Path, batches: list[torch.Tensor], keep_float: int = 0) -> None:
    """Static int8 quantization of `fp32` into `out` (`quantize_prepared`); the first `keep_float` convolutions stay
    in float."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        excluded = float_nodes(onnx.load(str(prepared)).graph, keep_float) if keep_float else []
        target = Path(scratch) / out.name
        quantize_prepared(prepared, target, batches, nodes_to_exclude=excluded)
        os.replace(target, out)


def export_bundle(bundle_dir: str | Path, manifest: str | Path | None = None, int8: bool = False,
                  calibration_images: int = 256, parity_images: int | None = None,
                  keep_float: int = 0) -> dict[str, Any]:
    """Export a bundle (each member of an ensemble) to ONNX and record the `export` block in its card.

    `manifest` is the bundle's own manifest (its hash must match the card's): parity is measured on its validation
    images (all of them, or the first `parity_images` of a seeded shuffle), one view and as served (the card's
    test-time views, calibrated), and int8 is calibrated on up to `calibration_images` training images, with the
    first `keep_float` convolutions left in float. Without a manifest, parity is measured on random inputs and int8
    cannot be calibrated. int8 is `validated` when the served probabilities (one view for a bundle without
    test-time augmentation) meet the rule: top-1 agreement >= 0.99 and |malignant AUC change| <= 0.005.
    """
    from pipelines.transforms import card_tta

    bundle_dir = Path(bundle_dir)
    card = read_card(bundle_dir)
    if ENSEMBLE in card:
        blocks = {folder: export_bundle(bundle_dir / folder, manifest, int8, calibration_images, parity_images,
                                        keep_float)
                  for folder in card[ENSEMBLE]["members"]}
        return {"members": blocks}
    if int8 and manifest is None:
        raise ValueError("int8 export is calibrated on the bundle's training images: give its manifest (--data)")
    if keep_float < 0:
        raise ValueError(f"keep_float {keep_float}: expected a number of convolutions >= 0")
    bundle = load_bundle(bundle_dir)
    model, size = bundle.model.eval(), bundle.input_size
    val_batches, val_labels, train_batches = _parity_images(bundle, manifest, calibration_images, parity_images)
    block: dict[str, Any] = {"opset": OPSET, "versions": _versions(),
                             "weights_sha256": file_sha256(bundle_dir / WEIGHTS_FILE)}
    fp32 = export_onnx(model, bundle_dir / ONNX_FILE, size)
    names, malignant, calibration = bundle.class_names, bundle.malignant_classes, bundle.card.get("calibration")
    eager = _views(model, val_batches, card_tta(bundle.card))
    on = "validation images of the manifest" if manifest else "random inputs"

    def parity_of(path: Path) -> dict[str, Any]:
        net = OnnxNet(path)
        exported = _views(lambda x: net(x)[0], val_batches, eager.shape[1])
        return {**_parity(eager, exported, val_labels, names, malignant, calibration), "on": on}

    block["fp32"] = {"file": ONNX_FILE, "sha256": file_sha256(fp32), "parity": parity_of(fp32)}
    log.info("%s: fp32 ONNX written, max |Δp| %.2e against eager", bundle_dir, block["fp32"]["parity"]
             ["max_abs_prob_diff"])
    if int8:
        target = bundle_dir / INT8_FILE
        _quantize_int8(fp32, target, train_batches, keep_float)
        parity = parity_of(target)
        judged = parity.get("served", parity)
        validated = (judged["top1_agreement"] >= INT8_MIN_AGREEMENT
                     and abs(judged.get("malignant_auc_change", 0.0)) <= INT8_MAX_AUC_CHANGE)
        block["int8"] = {"file": INT8_FILE, "sha256": file_sha256(target), "format": "QDQ, per-channel int8 "
                         "weights, uint8 activations", "float_convolutions": keep_float,
                         "calibrated_on": f"{len(torch.cat(train_batches))} training images of the manifest",
                         "parity": parity, "validated": bool(validated),
                         "rule": f"served top-1 agreement ≥ {INT8_MIN_AGREEMENT}, |served malignant AUC change| ≤ "
                                 f"{INT8_MAX_AUC_CHANGE}"}
        log.info("%s: int8 ONNX written; served top-1 agreement %.3f, validated: %s", bundle_dir,
                 judged["top1_agreement"], validated)
    else:
        stale = bundle_dir / INT8_FILE
        if stale.exists():
            stale.unlink()
    update_card(bundle_dir, export=block)
    return block


def _parity_images(bundle, manifest: str | Path | None, n_train: int,
                   n_val: int | None) -> tuple[list[torch.Tensor], np.ndarray | None, list[torch.Tensor]]:
    """Preprocessed validation batches (+ labels) and training batches from the bundle's manifest, or random inputs."""
    from pipelines.manifest import manifest_sha256, read_manifest
    from pipelines.transforms import card_transform

    if manifest is None:
        generator = torch.Generator().manual_seed(0)
        size = bundle.input_size
        return [torch.randn(8, 3, size, size, generator=generator) for _ in range(4)], None, []
    expected = bundle.card.get("manifest_sha256")
    if expected and manifest_sha256(manifest) != expected:
        raise ValueError(f"manifest '{manifest}' is not the one bundle '{bundle.path}' was trained on (its hash "
                         "differs from the card's manifest_sha256)")
    table = read_manifest(manifest)
    real = table[table.source == "real"] if "source" in table.columns else table
    transform = card_transform(bundle.card)
    val = real[real.split == "val"].sample(frac=1.0, random_state=0)
    val = val if n_val is None else val.head(n_val)
    train = real[real.split == "train"].sample(frac=1.0, random_state=0).head(n_train)
    if val.empty:
        raise ValueError(f"manifest '{manifest}' has no validation images to measure parity on")
    labels = np.array([bundle.class_names.index(c) for c in val.label])
    return list(_image_batches(list(val.path), transform)), labels, list(_image_batches(list(train.path), transform))
