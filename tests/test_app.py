"""The clinician app: a live server on 127.0.0.1 answering gradio_client calls, bad input, privacy, explanations."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest_app import SAMPLE_IMAGES, free_port, make_bundle, models_dir, serving  # noqa: F401
from PIL import Image

from models.bundle import load_bundle
from pipelines.prediction import Predictor

SAMPLE = SAMPLE_IMAGES / "ISIC_0024307.jpg"
OTHER = SAMPLE_IMAGES / "ISIC_0024337.jpg"
MAX_FILE_MB = 1.0
MAX_MEGAPIXELS = 1.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):  # noqa: F811
    """The app over the test bundles, on a free port, with small limits so that over-limit files stay small."""
    uploads = tmp_path_factory.mktemp("gradio")
    with serving(models_dir, uploads, max_file_mb=MAX_FILE_MB, max_megapixels=MAX_MEGAPIXELS,
                 upload_grace_s=0.2) as (demo, url):
        yield demo, url, uploads


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


@pytest.fixture(scope="module")
def predictor(models_dir):  # noqa: F811
    return Predictor(load_bundle(models_dir / "lite0"))


def classify(client, path: Path, model: str = "lite0"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), model, api_name="/classify")


def probabilities(result) -> np.ndarray:
    details = result[-1]
    return np.array(list(details["probabilities"].values()))


# ----------------------------------------------------------------------------------------------- correct answers


def test_container_smoke_check_reads_the_live_api(server, models_dir, tmp_path):  # noqa: F811
    """docker/smoke_check.py compares the served API with `lesionlab predict`; it must understand today's outputs."""
    sys.path.insert(0, str(ROOT / "docker"))
    import smoke_check

    from pipelines.cli import main

    folder = tmp_path / "two"
    folder.mkdir()
    for path in (SAMPLE, OTHER):
        (folder / path.name).write_bytes(path.read_bytes())
    csv = tmp_path / "p.csv"
    assert main(["predict", "--bundle", str(models_dir / "lite0"), "--images", str(folder), "--out", str(csv)]) == 0
    timings = smoke_check.compare_api(server[1], csv, folder, "lite0", 1e-4)
    assert timings["max_abs_diff"] <= 1e-4
    # ... and it notices an API that disagrees with the CSV.
    table = pd.read_csv(csv)
    table.loc[0, "prob_malignant"] += 0.05
    table.to_csv(csv, index=False)
    with pytest.raises(AssertionError, match="differ"):
        smoke_check.compare_api(server[1], csv, folder, "lite0", 1e-4)


def test_classify_equals_lesionlab_predict(client, models_dir, tmp_path):  # noqa: F811
    from pipelines.cli import main

    folder = tmp_path / "one"
    folder.mkdir()
    (folder / SAMPLE.name).write_bytes(SAMPLE.read_bytes())
    assert main(["predict", "--bundle", str(models_dir / "lite0"), "--images", str(folder),
                 "--out", str(tmp_path / "p.csv")]) == 0
    expected = pd.read_csv(tmp_path / "p.csv").iloc[0]

    referral, shown, heatmap, heat_note, outline, readout, details = classify(client, SAMPLE)
    assert details["predicted"] == expected["pred_label"]
    for name, p in details["probabilities"].items():
        assert p == pytest.approx(expected[f"prob_{name}"], abs=2e-6)
    assert details["prob_malignant"] == pytest.approx(expected["prob_malignant"], abs=2e-6)
    # Probabilities: every class with its full name, most probable first, rounded and capped.
    rows = [line for line in shown.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 7 and f"({expected['pred_label']})" in rows[0]
    assert all(re.search(r"\| (> 99|< 1|\d{1,2}) % \|$", row) for row in rows)
    # The headline is the referral decision, worded from the card (threshold 0.3, sensitivity 90 %, spec. 62 %).
    above = expected["prob_malignant"] >= 0.3
    assert ("Refer: above the referral threshold" if above else "Below the referral threshold") in referral
    assert "sent on 90 % of malignant lesions" in referral and "cleared 62 % of benign ones" in referral
    assert details["above_threshold"] == above
    assert details["referral"] == ("Refer: above the referral threshold" if above else "Below the referral threshold")
    assert f"Heat-map for: {details['explanation']['class']}" not in heat_note  # the full name, not the code
    assert "Heat-map for:" in heat_note and f"({details['predicted']})" in heat_note
    # Heat-map over the 64 px crop the model saw (enlarged to 320 px); the readout uses the captioning stage's code.
    from app.explain import LEGEND_HEIGHT

    with Image.open(heatmap) as image:  # with the colour bar underneath
        assert image.size == (320, 320 + LEGEND_HEIGHT) and image.mode == "RGB"
    from pipelines.abcd import abcd_descriptors

    abcd = abcd_descriptors(Image.open(SAMPLE).convert("RGB"))
    assert details["abcd"]["colour_count"] == abcd["colour_count"]
    assert details["abcd"]["diameter_px"] == pytest.approx(abcd["diameter_px"], abs=0.1)
    assert "A: asymmetry" in readout and f"{abcd['diameter_px']:.0f} px" in readout
    assert details["explanation"]["method"] == "gradcam"
    with Image.open(outline) as image:
        assert image.size == (128, 128)


def test_batch_matches_predict_columns_and_skips_bad_files(client, models_dir, tmp_path):  # noqa: F811
    from gradio_client import handle_file

    from pipelines.cli import main

    folder = tmp_path / "two"
    folder.mkdir()
    for source in (SAMPLE, OTHER):
        (folder / source.name).write_bytes(source.read_bytes())
    main(["predict", "--bundle", str(models_dir / "cnn"), "--images", str(folder), "--out", str(tmp_path / "p.csv")])
    expected = pd.read_csv(tmp_path / "p.csv")

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a picture at all")
    files = [handle_file(str(folder / SAMPLE.name)), handle_file(str(bad)), handle_file(str(folder / OTHER.name))]
    table, csv, note = client.predict(files, "cnn", api_name="/classify_batch")
    got = pd.read_csv(csv)
    assert list(got.columns) == list(expected.columns)
    # The screen: referral first, percentages, full names; the CSV keeps the `lesionlab predict` columns.
    headers = list(table["headers"])
    assert headers[:5] == ["image", "referral", "P(malignant) %", "most likely", "its probability"]
    assert "melanoma (mel) %" in headers
    first = dict(zip(headers, table["data"][0], strict=True))
    assert first["P(malignant) %"] == pytest.approx(100 * expected["prob_malignant"].iloc[0], abs=0.051)
    assert first["referral"] in ("Refer: above the referral threshold", "Below the referral threshold")
    # Pressing "Classify all" again (here with the other model) still finds the uploaded files.
    again, _, note_again = client.predict(files, "lite0", api_name="/classify_batch")
    assert len(again["data"]) == 2 and "2 of 3 images classified" in note_again
    assert got["image_id"].tolist() == expected["image_id"].tolist()
    assert got["pred_label"].tolist() == expected["pred_label"].tolist()
    numeric = [c for c in expected.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[numeric].to_numpy(), expected[numeric].to_numpy(), atol=2e-6)
    assert "2 of 3 images classified" in note and "'broken.png' is not a readable image" in note


def test_model_card_api_and_intended_use(client, server):
    card = client.predict("cnn", api_name="/model_card")
    assert "small-cnn" in card and "balanced accuracy) 58 %" in card and "malignant-vs-benign AUC 0.83" in card
    assert "sent on 90 % of malignant lesions and cleared 62 % of benign ones" in card
    assert "data/ham10000_sample" not in card and "Research use only" in card
    with urllib.request.urlopen(server[1] + "config", timeout=10) as response:
        config = response.read().decode()
    assert "Not a diagnostic device" in config


def test_health_endpoint_is_tiny_json(server):
    import json

    with urllib.request.urlopen(server[1] + "healthz", timeout=10) as response:
        body = response.read()
        assert response.headers["Content-Type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok" and set(health["models"]) == {"cnn", "lite0"} and health["version"]
    assert len(body) < 1000


# ----------------------------------------------------------------------------------------------- bad input


def _noise_png(path: Path, side: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


BAD_INPUTS = {
    "not an image": (lambda d: _write(d / "notes.jpg", b"Patient notes, definitely not a JPEG\n" * 20),
                     "is not a readable image"),
    "truncated": (lambda d: _write(d / "cut.jpg", SAMPLE.read_bytes()[: SAMPLE.stat().st_size // 2]),
                  "corrupt or truncated"),
    "zero bytes": (lambda d: _write(d / "empty.png", b""), r"empty \(0 bytes\)"),
    "too large": (lambda d: _noise_png(d / "big.png", 700), r"is 1.4 MB; at most 1 MB"),
    "too many pixels": (lambda d: _save(Image.new("RGB", (1200, 1000), (200, 150, 140)), d / "bomb.png"),
                        r"1.2 MP \(1200 x 1000\); at most 1 MP"),
    "too small": (lambda d: _save(Image.new("RGB", (20, 24), (200, 150, 140)), d / "tiny.png"),
                  r"20 x 24 px; at least 32 x 32 px"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gets_its_message_and_server_stays_up(client, predictor, tmp_path, kind):
    from gradio_client.exceptions import AppError

    make, message = BAD_INPUTS[kind]
    path = make(tmp_path)
    if kind == "too large":
        assert MAX_FILE_MB * 2**20 < path.stat().st_size < 2 * MAX_FILE_MB * 2**20
    with pytest.raises(AppError, match=message):
        classify(client, path)
    result = classify(client, SAMPLE)  # the next good request still succeeds
    np.testing.assert_allclose(probabilities(result), predictor.predict([Image.open(SAMPLE).convert("RGB")])[0],
                               atol=1e-6)


def _modes(rgb: Image.Image) -> dict[str, tuple[Image.Image, Image.Image, str]]:
    """mode name -> (image to upload, the RGB image it must decode to, file format)."""
    gray = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    alpha = np.full(rgb.size[::-1], 255, dtype=np.uint8)
    alpha[:16, :16] = 0  # a transparent corner is composited on white
    rgba.putalpha(Image.fromarray(alpha))
    white_corner = np.asarray(rgb).copy()
    white_corner[:16, :16] = 255
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    palette = rgb.quantize(64)
    cmyk = rgb.convert("CMYK")
    return {
        "grayscale": (gray, gray.convert("RGB"), "PNG"),
        "RGBA": (rgba, Image.fromarray(white_corner), "PNG"),
        "16-bit": (sixteen, gray.convert("RGB"), "PNG"),
        "CMYK": (cmyk, cmyk.convert("RGB"), "TIFF"),
        "palette": (palette, palette.convert("RGB"), "PNG"),
        "BMP": (rgb, rgb, "BMP"),
        "WebP lossless": (rgb, rgb, "WEBP"),
    }


@pytest.mark.parametrize("mode", ["grayscale", "RGBA", "16-bit", "CMYK", "palette", "BMP", "WebP lossless"])
def test_image_modes_are_converted_correctly(client, predictor, tmp_path, mode):
    rgb = Image.open(SAMPLE).convert("RGB")
    upload, reference, fmt = _modes(rgb)[mode]
    options = {"lossless": True} if fmt == "WEBP" else {}
    path = _save(upload, tmp_path / f"image.{fmt.lower()}", format=fmt, **options)
    got = probabilities(classify(client, path))
    np.testing.assert_allclose(got, predictor.predict([reference])[0], atol=1e-6)


def test_exif_orientation_is_applied(client, predictor, tmp_path):
    upright = Image.open(SAMPLE).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # a camera that stored it turned, with EXIF saying so
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    exif[0x010F] = "SecretCam"  # metadata that must not come back
    path = _save(stored, tmp_path / "turned.png", exif=exif)
    got = probabilities(classify(client, path))
    np.testing.assert_allclose(got, predictor.predict([upright])[0], atol=1e-6)
    assert not np.allclose(got, predictor.predict([stored])[0], atol=1e-3)  # the test could fail


# ----------------------------------------------------------------------------------------------- privacy, load


def test_uploads_deleted_outputs_stripped_and_names_not_logged(client, server, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    _, _, uploads = server
    secret = "jane_doe_1962"
    good = _save(Image.open(SAMPLE).convert("RGB"), tmp_path / f"{secret}.jpg", exif=_camera_exif())
    bad = _write(tmp_path / f"{secret}_scan.jpg", b"\x00" * 100)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError):
        classify(client, bad)
    result = classify(client, good)
    for returned in (result[2], result[4]):  # heat-map and outline: PNG without EXIF or text chunks
        with Image.open(returned) as image:
            assert not image.getexif() and "exif" not in image.info
            assert not {k for k in image.info if k not in ("dpi", "gamma", "srgb")}
    deadline = time.time() + 5
    while time.time() < deadline and _named(uploads, secret):
        time.sleep(0.1)
    assert not _named(uploads, secret), "uploads must be deleted after the request"
    logged = caplog.text + "".join(capfd.readouterr())
    assert "analysed one image" in caplog.text  # the log is captured at all
    assert secret not in logged


def _named(root: Path, prefix: str) -> list[str]:
    """Files and folders under `root` whose name starts with `prefix`. os.walk, unlike Path.rglob, skips a folder
    that the server deletes while it is being walked instead of raising FileNotFoundError."""
    return [name for _, dirs, files in os.walk(root) for name in dirs + files if name.startswith(prefix)]


def _camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif[0x0132] = "2024:01:01 10:00:00"
    return exif


def test_parallel_requests_give_identical_answers(client, predictor):
    expected = predictor.predict([Image.open(OTHER).convert("RGB")])[0]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: probabilities(classify(client, OTHER)), range(6)))
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- pieces


def test_explainer_heatmaps_and_predictor_untouched(models_dir, tmp_path):  # noqa: F811
    from app.explain import Explainer

    image = Image.open(SAMPLE).convert("RGB")
    vit_dir = make_bundle(tmp_path / "vit", "vit", 64, patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2,
                          num_heads=2)
    for folder, method in ((models_dir / "lite0", "gradcam"), (models_dir / "cnn", "gradcam"), (vit_dir, "attention")):
        bundle = load_bundle(folder)
        predictor = Predictor(bundle)
        before = predictor.predict([image])
        explanation = Explainer(bundle).explain(image, int(before[0].argmax()))
        assert explanation.method == method
        heat = explanation.heatmap
        assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() == pytest.approx(1.0) and heat.std() > 0.01
        assert explanation.overlay(legend=False).size == (320, 320)
        assert explanation.overlay(min_side=0, legend=False).size == (64, 64)
        # The served network gets no hooks and gives the same answer afterwards.
        assert all(not m._forward_hooks and not m._backward_hooks for m in bundle.model.modules())
        np.testing.assert_array_equal(predictor.predict([image]), before)


def test_discover_bundles_errors(tmp_path, models_dir):  # noqa: F811
    from app.service import discover_bundles

    assert sorted(discover_bundles(models_dir)) == ["cnn", "lite0"]
    assert list(discover_bundles(models_dir / "cnn")) == ["cnn"]  # a single bundle folder works too
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        discover_bundles(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_bundles(tmp_path / "missing")


def test_janitor_never_deletes_files_outside_the_upload_cache(tmp_path):
    from app.janitor import FileJanitor

    cache = tmp_path / "cache"
    (cache / "abc").mkdir(parents=True)
    inside = _write(cache / "abc" / "x.jpg", b"1")
    outside = _write(tmp_path / "mine.jpg", b"1")
    janitor = FileJanitor(cache, grace_s=0)
    first, second = janitor.hold([inside, outside]), janitor.hold([inside])
    assert first == [inside.resolve()]
    janitor.release(first)
    assert inside.exists()  # still held by the second request (identical uploads share one file)
    janitor.release(second)
    assert not inside.exists() and not (cache / "abc").exists() and outside.exists()


def test_lesionlab_serve_command(models_dir, tmp_path):  # noqa: F811
    from gradio_client import Client

    port = free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (scratch / f"lesionlab-out-{dead.pid}-x1" / "batch-1").mkdir(parents=True)  # a killed server's leftovers
    (scratch / f"lesionlab-gradio-{os.getpid()}-x2").mkdir()  # a running process's folder: kept
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop("GRADIO_TEMP_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--models", str(models_dir), "--port", str(port),
         "--concurrency", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        card = Client(url, verbose=False).predict("lite0", api_name="/model_card")
        assert "efficientnet-lite0" in card
        own = sorted(p.name for p in scratch.iterdir() if f"-{process.pid}-" in p.name)
        assert len(own) == 2, own  # its upload cache and its output folder
        assert not (scratch / f"lesionlab-out-{dead.pid}-x1").exists()
    finally:
        process.terminate()  # SIGTERM, as `docker stop` sends
        process.wait(timeout=30)
    output = process.stdout.read().decode()
    assert "loaded model 'lite0'" in output and "removed 1 scratch folder" in output
    assert process.returncode == 0, output[-2000:]
    assert [p.name for p in scratch.iterdir() if p.name.startswith("lesionlab-")] == [
        f"lesionlab-gradio-{os.getpid()}-x2"], "everything the server wrote is removed when it stops"


def test_a_long_strip_is_classified_with_a_warning(client, tmp_path):
    strip = _save(Image.open(SAMPLE).convert("RGB").resize((2000, 40)), tmp_path / "strip.png")
    referral, *_, details = classify(client, strip)
    assert details["warnings"] and "50 times wider than it is tall" in details["warnings"][0]
    assert "Outside what this model was validated on" in referral
    plain = classify(client, SAMPLE)
    assert plain[-1]["warnings"] == [] and "ll-warning" not in plain[0]
