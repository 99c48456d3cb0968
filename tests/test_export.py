"""ONNX export: parity with the eager network, int8, the Predictor's engine choice and the stale-file guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_bundle: Path, small_manifest: Path, tmp_path_factory) -> Path:
    from pipelines.export import export_bundle

    bundle = tmp_path_factory.mktemp("export") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    export_bundle(bundle, small_manifest, int8=True, calibration_images=64)
    return bundle


def _images(manifest: Path, n: int = 12) -> list[Image.Image]:
    from pipelines.manifest import read_manifest

    table = read_manifest(manifest)
    return [Image.open(p).convert("RGB") for p in table[table.split == "test"].path.head(n)]


def test_export_writes_both_files_and_records_parity_in_the_card(exported: Path):
    card = json.loads((exported / "card.json").read_text())
    block = card["export"]
    assert (exported / "model.onnx").is_file() and (exported / "model.int8.onnx").is_file()
    assert block["opset"] >= 17 and "onnxruntime" in block["versions"]
    assert block["fp32"]["parity"]["max_abs_prob_diff"] < 1e-4
    assert block["fp32"]["parity"]["images"] == 28  # the small manifest's 4 validation images per class
    assert block["int8"]["parity"]["top1_agreement"] >= 0.8
    assert isinstance(block["int8"]["validated"], bool)


def test_onnx_predictor_matches_eager_with_tta_and_ood(exported: Path, small_manifest: Path):
    from pipelines.prediction import Predictor

    images = _images(small_manifest)
    eager = Predictor.from_path(exported, engine="eager", tta=8)
    onnx = Predictor.from_path(exported, engine="onnx", tta=8)
    assert eager.engine == "eager" and onnx.engine == "onnx (model.onnx)"
    p_eager, s_eager = eager.predict_with_ood(images)
    p_onnx, s_onnx = onnx.predict_with_ood(images)
    np.testing.assert_allclose(p_onnx, p_eager, atol=1e-4)
    if s_eager is not None:  # the out-of-distribution score reads the exported graph's features output
        np.testing.assert_allclose(s_onnx, s_eager, rtol=1e-3, atol=1e-3)
    int8 = Predictor.from_path(exported, engine="int8", tta=1).predict(images)
    assert (int8.argmax(1) == eager.predict(images).argmax(1)).mean() >= 0.75


def test_auto_engine_follows_the_card(exported: Path, tmp_path: Path):
    from pipelines.prediction import Predictor

    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    card = json.loads((bundle / "card.json").read_text())
    card["export"]["int8"]["validated"] = False
    (bundle / "card.json").write_text(json.dumps(card))
    assert Predictor.from_path(bundle).engine == "onnx (model.onnx)"
    card["export"]["int8"]["validated"] = True
    (bundle / "card.json").write_text(json.dumps(card))
    assert Predictor.from_path(bundle).engine == "onnx (model.int8.onnx)"
    del card["export"]
    (bundle / "card.json").write_text(json.dumps(card))
    assert Predictor.from_path(bundle).engine == "eager"
    with pytest.raises(ValueError, match="has no exported model; run `lesionlab export"):
        Predictor.from_path(bundle, engine="onnx")


def test_an_export_of_other_weights_is_refused(exported: Path, tmp_path: Path):
    from pipelines.prediction import Predictor

    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    weights = load_file(bundle / "weights.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 0.01
    save_file(weights, bundle / "weights.safetensors")
    with pytest.raises(ValueError, match="exported from other weights"):
        Predictor.from_path(bundle)
    assert Predictor.from_path(bundle, engine="eager").engine == "eager"


def test_saving_new_weights_drops_the_export(exported: Path, tmp_path: Path):
    from models.bundle import load_bundle, save_bundle

    bundle = tmp_path / "b"
    shutil.copytree(exported, bundle)
    loaded = load_bundle(bundle)
    save_bundle(bundle, loaded.model, {k: v for k, v in loaded.card.items() if k != "format_version"})
    card = json.loads((bundle / "card.json").read_text())
    assert "export" not in card
    assert not (bundle / "model.onnx").exists() and not (bundle / "model.int8.onnx").exists()


def test_int8_needs_the_bundles_own_manifest(tiny_bundle: Path, ham_manifest, tmp_path: Path):
    from pipelines.export import export_bundle
    from pipelines.manifest import write_manifest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(ValueError, match="give its manifest"):
        export_bundle(bundle, None, int8=True)
    other = write_manifest(ham_manifest.head(200), tmp_path / "other.csv")
    with pytest.raises(ValueError, match="is not the one bundle"):
        export_bundle(bundle, other, int8=True)
    assert not (bundle / "model.onnx").exists()


def test_ensemble_export_exports_each_member(tiny_bundle: Path, small_manifest: Path, tmp_path: Path):
    from models.bundle import load_bundle, save_ensemble
    from pipelines.export import export_bundle
    from pipelines.prediction import Predictor

    member = load_bundle(tiny_bundle)
    card = {k: v for k, v in member.card.items() if k not in ("format_version", "versions")}
    save_ensemble(tmp_path / "ens", [(member.model, card), (member.model, card)], {})
    summary = export_bundle(tmp_path / "ens", small_manifest)
    assert set(summary["members"]) == {"member_0", "member_1"}
    assert (tmp_path / "ens" / "member_1" / "model.onnx").is_file()
    images = _images(small_manifest, 4)
    np.testing.assert_allclose(Predictor.from_path(tmp_path / "ens").predict(images),
                               Predictor.from_path(tmp_path / "ens", engine="eager").predict(images), atol=1e-4)


def test_int8_keeps_the_first_convolutions_in_float_and_is_judged_as_served(tiny_bundle: Path, small_manifest: Path,
                                                                            tmp_path: Path):
    import onnx

    from pipelines.export import export_bundle, float_nodes

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    card = json.loads((bundle / "card.json").read_text())
    card["inference"] = {"tta": 8}
    (bundle / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="keep_float -1"):
        export_bundle(bundle, small_manifest, int8=True, keep_float=-1)
    block = export_bundle(bundle, small_manifest, int8=True, calibration_images=32, keep_float=2)

    fp32 = onnx.load(str(bundle / "model.onnx")).graph
    first_two = [n.input[1] for n in fp32.node if n.op_type == "Conv"][:2]
    assert float_nodes(fp32, 2)[:2] == [n.name for n in fp32.node if n.op_type == "Conv"][:2]
    int8 = onnx.load(str(bundle / "model.int8.onnx")).graph
    produced_by = {out: node.op_type for node in int8.node for out in node.output}
    in_float = [n.input[1] for n in int8.node if n.op_type == "Conv" and produced_by.get(n.input[1]) is None]
    quantized = [n for n in int8.node if n.op_type == "Conv" and produced_by.get(n.input[1]) == "DequantizeLinear"]
    assert in_float == first_two and quantized  # exactly the first two stay float, the rest is int8
    assert block["int8"]["float_convolutions"] == 2

    for entry in ("fp32", "int8"):  # one view at the top level, the 8 calibrated views under `served`
        parity = block[entry]["parity"]
        assert parity["served"]["views"] == 8 and parity["images"] == 28
    assert block["fp32"]["parity"]["served"]["max_abs_prob_diff"] < 1e-4
    served = block["int8"]["parity"]["served"]
    expected = served["top1_agreement"] >= 0.99 and abs(served.get("malignant_auc_change", 0.0)) <= 0.005
    assert block["int8"]["validated"] is expected
