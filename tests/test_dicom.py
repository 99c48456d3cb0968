"""DICOM input: single-frame images decode to the right pixels everywhere images are read, and no patient attribute
ever reaches a message, a log line, a prediction CSV or the app's details."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest_app import SAMPLE_IMAGES, models_dir, serving  # noqa: F401
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder

from pipelines.images import IMAGE_SUFFIXES, ImageError, ImageLimits, is_dicom, load_image

SAMPLE = SAMPLE_IMAGES / "ISIC_0024307.jpg"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-12345", "PatientBirthDate": "19620417",
           "OtherPatientIDs": "OTHER-778899", "AccessionNumber": "ACC-5566"}
SECRETS = ("Doe^Jane", "Doe", "PID-12345", "19620417", "OTHER-778899", "ACC-5566")


def sample_rgb() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))


def sample_grey() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("L"))


def dermoscopy_dataset(syntax: str = uid.ExplicitVRLittleEndian) -> Dataset:
    """A VL Photographic Image dataset that carries patient attributes, without its pixels yet."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = VL_PHOTOGRAPHIC
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "XC"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    return ds


def with_pixels(pixels: np.ndarray, photometric: str, bits: int, **attributes) -> Dataset:
    ds = dermoscopy_dataset()
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def encapsulated(syntax: str, fragment: bytes, rows: int, columns: int, photometric: str = "YBR_FULL_422") -> Dataset:
    """A compressed single-frame dataset whose one fragment is `fragment`."""
    ds = dermoscopy_dataset(syntax)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1 if photometric.startswith("MONOCHROME") else 3
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def write(ds: Dataset, path: Path) -> Path:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return path


def assert_private(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"patient attribute {secret!r} leaked"


# ----------------------------------------------------------------------------------------------- decoding


def test_rgb_vl_photographic_gives_the_jpeg_pixels(tmp_path):
    path = write(with_pixels(sample_rgb(), "RGB", 8), tmp_path / "lesion.dcm")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (128, 128) and not image.info
    np.testing.assert_array_equal(np.asarray(image), sample_rgb())
    # Found by its content as well: no suffix, or a misleading one.
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and is_dicom(data) and not is_dicom(SAMPLE.read_bytes(), "x.jpg")
    np.testing.assert_array_equal(np.asarray(load_image(data)), sample_rgb())
    np.testing.assert_array_equal(np.asarray(load_image(data, name="export.png")), sample_rgb())
    assert {".dcm", ".dicom"} <= IMAGE_SUFFIXES
    # An old-style file without preamble or file meta information (implicit VR): found by its .dcm name.
    bare = with_pixels(sample_rgb(), "RGB", 8)
    del bare.file_meta
    buffer = io.BytesIO()
    bare.save_as(buffer, implicit_vr=True, little_endian=True)
    assert b"DICM" not in buffer.getvalue()[:200]
    (tmp_path / "old.dcm").write_bytes(buffer.getvalue())
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "old.dcm")), sample_rgb())


@pytest.mark.parametrize("syntax", ["JPEG Baseline", "JPEG 2000 lossless"])
def test_compressed_dicom_decodes_like_its_source(tmp_path, syntax):
    rgb = sample_rgb()
    if syntax == "JPEG Baseline":  # the sample JPEG itself, as a dermatoscope's DICOM export stores it
        ds = encapsulated(uid.JPEGBaseline8Bit, SAMPLE.read_bytes(), 128, 128, "YBR_FULL_422")
    else:  # lossless, reversible colour transform
        codestream = io.BytesIO()
        Image.fromarray(rgb).save(codestream, format="JPEG2000", irreversible=False, no_jp2=True, mct=1)
        ds = encapsulated(uid.JPEG2000Lossless, codestream.getvalue(), 128, 128, "YBR_RCT")
    image = np.asarray(load_image(write(ds, tmp_path / "compressed.dicom"))).astype(int)
    assert np.abs(image - rgb).max() <= 2


@pytest.mark.parametrize("kind", ["YBR_FULL", "YBR_FULL_422", "MONOCHROME2 16-bit", "MONOCHROME2 8-bit",
                                  "MONOCHROME1", "MONOCHROME2 12-bit windowed"])
def test_photometric_interpretations(tmp_path, kind):
    rgb, grey = sample_rgb(), sample_grey()
    if kind.startswith("YBR"):
        ds = with_pixels(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", 8)
        if kind == "YBR_FULL_422":  # stored with chroma averaged over pixel pairs, as the standard packs it
            ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(int)
            pairs = ybr.reshape(128, 64, 2, 3)
            chroma = np.rint(pairs[..., 1:].mean(axis=2)).astype(np.uint8)
            packed = np.concatenate([pairs[..., 0, :1], pairs[..., 1, :1], chroma], axis=2)
            ds.PixelData = packed.astype(np.uint8).tobytes()
            ds.PhotometricInterpretation = "YBR_FULL_422"
        expected, tolerance = rgb, 2 if kind == "YBR_FULL" else 8
    elif kind == "MONOCHROME2 16-bit":
        ds, expected, tolerance = with_pixels(grey.astype(np.uint16) * 257, "MONOCHROME2", 16), grey, 0
    elif kind == "MONOCHROME2 8-bit":
        ds, expected, tolerance = with_pixels(grey, "MONOCHROME2", 8), grey, 0
    elif kind == "MONOCHROME1":  # 0 is white
        ds, expected, tolerance = with_pixels(255 - grey, "MONOCHROME1", 8), grey, 0
    else:  # 12 bits stored, window over the full range: the window maps it back to 0..255
        ds = with_pixels(grey.astype(np.uint16) * 16, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)
        expected, tolerance = grey, 1
    image = np.asarray(load_image(write(ds, tmp_path / "scan.dcm"))).astype(int)
    if expected.ndim == 2:
        assert (image == image[..., :1]).all()  # grey in, grey out
        expected = np.repeat(expected[..., None], 3, axis=2)
    difference = np.abs(image - expected)
    assert difference.max() <= tolerance
    if kind == "YBR_FULL_422":  # lossy chroma; the colours must still be right, not swapped or left in YCbCr
        assert difference.mean() < 1


def test_a_narrow_window_brightens_a_dark_image(tmp_path):
    grey = sample_grey().astype(np.uint16) * 16
    full = with_pixels(grey, "MONOCHROME2", 12, WindowCenter=2048, WindowWidth=4096)
    narrow = with_pixels(grey, "MONOCHROME2", 12, WindowCenter=1024, WindowWidth=2048)
    shown = [np.asarray(load_image(write(ds, tmp_path / f"{i}.dcm"))).mean() for i, ds in enumerate((full, narrow))]
    assert shown[1] > shown[0] + 30


# ----------------------------------------------------------------------------------------------- refusals


def test_multi_frame_is_refused(tmp_path):
    frames = np.stack([sample_rgb()] * 3)
    path = write(with_pixels(frames, "RGB", 8), tmp_path / "series.dcm")
    with pytest.raises(ImageError, match="image 'series.dcm' has 3 frames; a single-frame image is expected") as err:
        load_image(path)
    assert_private(str(err.value))


def test_pixel_limit_is_applied_before_decoding(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import Decoder

    def never(*args, **kwargs):
        pytest.fail("the pixel data was decoded before the pixel limit was checked")

    monkeypatch.setattr(Decoder, "as_array", never)
    # The header declares 10,000 x 10,000 px; the file stays small (a JPEG fragment, or 128 x 128 raw pixels).
    huge = encapsulated(uid.JPEGBaseline8Bit, SAMPLE.read_bytes(), 10_000, 10_000)
    raw = with_pixels(sample_rgb(), "RGB", 8, Rows=10_000, Columns=10_000)
    for name, ds in (("huge.dcm", huge), ("raw.dcm", raw)):
        with pytest.raises(ImageError, match=rf"image '{name}' has 100.0 MP \(10000 x 10000\); at most 50 MP") as err:
            load_image(write(ds, tmp_path / name))
        assert_private(str(err.value))
    with pytest.raises(ImageError, match="has 0.0 MP"):
        load_image(write(with_pixels(sample_rgb(), "RGB", 8), tmp_path / "ok.dcm"), ImageLimits(max_pixels=10_000))
    path = write(with_pixels(sample_rgb(), "RGB", 8), tmp_path / "big.dcm")
    with pytest.raises(ImageError, match=r"image 'big.dcm' is 0.0 MB; at most 0 MB"):
        load_image(path, ImageLimits(max_bytes=1000))


def test_undecodable_and_broken_files_name_the_file_and_what_is_expected(tmp_path):
    missing = [s for s in (uid.JPEGLSLossless, uid.HTJ2K, uid.JPEGLosslessSV1) if not get_decoder(s).is_available]
    if missing:  # with every optional decoder installed there is nothing left to refuse here
        syntax = missing[0]
        path = write(encapsulated(syntax, b"\xff\xd8" + bytes(200), 64, 64, "MONOCHROME2"), tmp_path / "ls.dcm")
        with pytest.raises(ImageError) as err:
            load_image(path)
        message = str(err.value)
        assert f"DICOM file 'ls.dcm' stores its pixels as {syntax.name}" in message
        assert "cannot be decoded here; expected uncompressed" in message and "JPEG Baseline" in message
        assert_private(message)
    # Pixel data shorter than the header promises (uncompressed), and a JPEG fragment that is not a JPEG.
    short = with_pixels(sample_rgb(), "RGB", 8)
    short.PixelData = short.PixelData[:1000]
    garbage = encapsulated(uid.JPEGBaseline8Bit, b"\xff\xd8 not a jpeg at all", 128, 128)
    no_pixels = dermoscopy_dataset()
    palette = with_pixels(sample_grey(), "MONOCHROME2", 8, PhotometricInterpretation="PALETTE COLOR")
    cases = {
        "short.dcm": (short, "DICOM file 'short.dcm' has pixel data that could not be decoded"),
        "garbage.dcm": (garbage, "DICOM file 'garbage.dcm' has pixel data that could not be decoded"),
        "report.dcm": (no_pixels, "DICOM file 'report.dcm' holds no pixel data; expected a DICOM image"),
        "palette.dcm": (palette, "DICOM file 'palette.dcm' has photometric interpretation 'PALETTE COLOR'; "
                                 "expected MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422, YBR_ICT or YBR_RCT"),
    }
    for name, (ds, expected) in cases.items():
        with pytest.raises(ImageError) as err:
            load_image(write(ds, tmp_path / name))
        assert expected in str(err.value)
        assert_private(str(err.value))
    # A .dcm name on a file that is not DICOM, and the DICM marker followed by nonsense.
    with pytest.raises(ImageError, match="'photo.dcm'"):
        load_image(SAMPLE.read_bytes(), name="photo.dcm")
    with pytest.raises(ImageError, match="'odd.bin'"):
        load_image(bytes(128) + b"DICM" + b"\xff" * 50, name="odd.bin")


# ----------------------------------------------------------------------------------------------- predict and app


def test_predict_folder_mixing_jpeg_and_dicom(models_dir, tmp_path, caplog, capsys):  # noqa: F811
    from pipelines.cli import main

    caplog.set_level(logging.DEBUG)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / SAMPLE.name).write_bytes(SAMPLE.read_bytes())
    write(with_pixels(sample_rgb(), "RGB", 8), folder / "visit_2.dcm")
    ds = with_pixels(sample_rgb(), "RGB", 8)
    write(ds, folder / "no_suffix")  # recognised by its DICM marker
    write(with_pixels(np.stack([sample_rgb()] * 2), "RGB", 8), folder / "series.dcm")
    out = tmp_path / "preds.csv"
    assert main(["predict", "--bundle", str(models_dir / "cnn"), "--images", str(folder), "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("image_id")
    assert sorted(table.index) == ["ISIC_0024307", "no_suffix", "visit_2"]  # the file stem, as for other images
    probabilities = [c for c in table.columns if c.startswith("prob_")]
    for stem in ("visit_2", "no_suffix"):
        np.testing.assert_allclose(table.loc[stem, probabilities].to_numpy(float),
                                   table.loc["ISIC_0024307", probabilities].to_numpy(float), atol=1e-6)
    streams = capsys.readouterr()
    assert "series.dcm' has 2 frames; a single-frame image is expected" in streams.err
    assert "skipped" in caplog.text  # the log is captured at all
    for text in (out.read_text(), caplog.text, streams.out, streams.err):
        assert_private(text)


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):  # noqa: F811
    from gradio_client import Client

    with serving(models_dir, tmp_path_factory.mktemp("gradio-dicom"), upload_grace_s=0.2) as (demo, url):
        yield Client(url, verbose=False)


def test_app_classifies_dicom_without_showing_patient_data(client, tmp_path, caplog, capfd):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    caplog.set_level(logging.DEBUG)
    dicom = write(with_pixels(sample_rgb(), "RGB", 8), tmp_path / "lesion.dcm")
    from_dicom = client.predict(handle_file(str(dicom)), "cnn", api_name="/classify")
    from_jpeg = client.predict(handle_file(str(SAMPLE)), "cnn", api_name="/classify")
    details = from_dicom[-1]
    assert details["probabilities"] == pytest.approx(from_jpeg[-1]["probabilities"], abs=1e-6)
    assert details["predicted"] == from_jpeg[-1]["predicted"]
    series = write(with_pixels(np.stack([sample_rgb()] * 2), "RGB", 8), tmp_path / "series.dcm")
    with pytest.raises(AppError, match="has 2 frames; a single-frame image is expected") as refused:
        client.predict(handle_file(str(series)), "cnn", api_name="/classify")
    table, csv, note = client.predict([handle_file(str(dicom)), handle_file(str(series))], "cnn",
                                      api_name="/classify_batch")
    assert "1 of 2 images classified" in note and "'series.dcm' has 2 frames" in note
    assert pd.read_csv(csv)["image_id"].tolist() == ["lesion"]
    shown = [json.dumps(details), *map(str, from_dicom[:-1]), str(refused.value), json.dumps(table), note,
             Path(csv).read_text(), caplog.text, "".join(capfd.readouterr())]
    assert "analysed one image" in caplog.text  # the log is captured at all
    for text in shown:
        assert_private(text)


def test_evaluate_reads_a_class_folder_of_dicom_files(models_dir, tmp_path, capsys):  # noqa: F811
    from pipelines.cli import main

    files = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4]
    for index, file in enumerate(files):
        folder = tmp_path / "data" / ("mel" if index % 2 else "nv")
        folder.mkdir(parents=True, exist_ok=True)
        write(with_pixels(np.asarray(Image.open(file).convert("RGB")), "RGB", 8), folder / f"{file.stem}.dcm")
    out = tmp_path / "eval"
    assert main(["evaluate", "--bundle", str(models_dir / "cnn"), "--data", str(tmp_path / "data"),
                 "--out", str(out)]) == 0
    predictions = pd.read_csv(out / "predictions.csv")
    assert sorted(predictions["image_id"]) == [f.stem for f in files]
    written = "".join(p.read_text() for p in out.rglob("*") if p.suffix in (".csv", ".md", ".json"))
    streams = capsys.readouterr()
    for text in (written, streams.out, streams.err):
        assert_private(text)
