"""Label guards at ingest: expected classes, malignant classes, split minimums, unique ids and one-line errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import ConfigError, RunConfig, load_config
from pipelines.manifest import ManifestError, grouped_split, ingest_class_folders, ingest_ham10000, write_manifest
from pipelines.run import stage_ingest
from tests.conftest import REPO

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 90, 40)).save(path)


def _ham(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A HAM10000 layout (metadata.csv + images/) with one tiny image per (image_id, lesion_id, dx) row."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, (image_id, _, _) in enumerate(rows):
        _image(root / "images" / f"{image_id}.jpg", i)
    lines = ["image_id,lesion_id,dx"] + [",".join(row) for row in rows]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def _rows(counts: dict[str, int]) -> list[tuple[str, str, str]]:
    """`counts[dx]` images per class, each its own lesion."""
    return [(f"{dx}_{i}", f"L_{dx}_{i}", dx) for dx, n in counts.items() for i in range(n)]


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, check it fails with exit code 2 and one error line, and return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"lesionlab {argv[0]}: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------------------------------- class lists


def test_unknown_class_is_named_with_its_count_when_classes_are_listed(tmp_path: Path, capsys) -> None:
    root = _ham(tmp_path / "ham", _rows({"nv": 4, "mel": 3, "melanomaa": 1}))
    with pytest.raises(ManifestError, match=r"unknown class 'melanomaa' \(1 image\) in '.*metadata.csv'; expected"):
        ingest_ham10000(root, classes=HAM_CLASSES)
    line = _cli_error(capsys, ["ingest", "--root", str(root), "--out", str(tmp_path / "m.csv"), "--no-split",
                               "--classes", *HAM_CLASSES])
    assert "'melanomaa' (1 image)" in line and "akiec, bcc" in line


def test_config_classes_reach_the_ingest_stage(tmp_path: Path) -> None:
    root = _ham(tmp_path / "ham", _rows({"nv": 4, "mel": 3, "melanomaa": 2}))
    config = RunConfig.model_validate({"data": {"root": str(root), "classes": HAM_CLASSES}})
    with pytest.raises(ManifestError, match=r"'melanomaa' \(2 images\)"):
        stage_ingest(config, tmp_path / "run", None)


def test_classes_found_are_logged_with_counts_and_small_ones_warned(tmp_path: Path, caplog) -> None:
    root = _ham(tmp_path / "ham", _rows({"nv": 25, "mel": 3}))
    with caplog.at_level(logging.INFO, logger="pipelines.manifest"):
        ingest_ham10000(root)
    assert "mel 3, nv 25" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mel (3)" in warnings[0] and "nv" not in warnings[0]


# ----------------------------------------------------------------------------------------------- malignant classes


def test_misspelt_malignant_class_is_an_error_not_dropped(tmp_path: Path, capsys) -> None:
    root = _ham(tmp_path / "ham", _rows({"nv": 4, "mel": 3, "bcc": 3, "akiec": 3}))
    with pytest.raises(ManifestError, match=r"malignant_classes names 'akeic', which is not a class"):
        ingest_ham10000(root, malignant_classes=["mel", "bcc", "akeic"])
    config = RunConfig.model_validate({"data": {"root": str(root), "malignant_classes": ["mel", "bcc", "akeic"]}})
    with pytest.raises(ManifestError, match="'akeic'"):
        stage_ingest(config, tmp_path / "run", None)
    line = _cli_error(capsys, ["ingest", "--root", str(root), "--out", str(tmp_path / "m.csv"), "--no-split",
                               "--malignant-classes", "mel", "bcc", "akeic"])
    assert "'akeic'" in line and "akiec, bcc, mel, nv" in line


def test_malignant_class_outside_a_manifests_labels_is_an_error(tmp_path: Path) -> None:
    df = ingest_ham10000(_ham(tmp_path / "ham", _rows({"nv": 4, "mel": 3})))
    manifest = write_manifest(df.assign(split="train"), tmp_path / "manifest.csv")
    config = RunConfig.model_validate({"data": {"format": "manifest", "manifest": str(manifest),
                                                "malignant_classes": ["mel", "bcc"]}})
    with pytest.raises(ManifestError, match=r"'bcc', which is not a class in '.*manifest.csv'; classes: mel, nv"):
        stage_ingest(config, tmp_path / "run", None)


def test_config_refuses_malignant_classes_outside_its_class_list(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  classes: [nv, mel, akiec]\n  malignant_classes: [mel, akeic]\n")
    with pytest.raises(ConfigError, match=r"data.malignant_classes names 'akeic', not in data.classes"):
        load_config(path)


# ------------------------------------------------------------------------------------------ split needs, ids, groups


def test_class_with_too_few_groups_for_the_split_is_named(tmp_path: Path) -> None:
    df = ingest_ham10000(_ham(tmp_path / "ham", _rows({"nv": 30, "mel": 30, "df": 2})))
    with pytest.raises(ManifestError, match=r"class 'df' has 2 images in 2 groups; .* at least 3 groups per class"):
        grouped_split(df, 0.15, 0.15, seed=0)


def test_duplicate_image_ids_in_metadata_are_named(tmp_path: Path) -> None:
    rows = _rows({"nv": 6, "mel": 6})
    root = _ham(tmp_path / "ham", rows + [("nv_2", "L_other", "nv"), ("mel_4", "L_x", "mel")])
    with pytest.raises(ManifestError, match=r"repeats 2 image_ids \(4 rows\), e.g. 'nv_2' \(2x\), 'mel_4' \(2x\)"):
        ingest_ham10000(root)


def test_blank_lesion_ids_are_named(tmp_path: Path, capsys) -> None:
    rows = [(i, "" if n % 5 == 0 else lesion, dx) for n, (i, lesion, dx) in enumerate(_rows({"nv": 15, "mel": 15}))]
    root = _ham(tmp_path / "ham", rows)
    with pytest.raises(ManifestError, match=r"6 rows with a blank lesion_id, e.g. image_id 'nv_0'"):
        ingest_ham10000(root)
    assert "blank lesion_id" in _cli_error(capsys, ["ingest", "--root", str(root), "--out", str(tmp_path / "m.csv")])


def test_blank_groups_are_refused_by_the_split(tmp_path: Path) -> None:
    df = ingest_ham10000(_ham(tmp_path / "ham", _rows({"nv": 15, "mel": 15})))
    df.loc[3, "group"] = ""
    with pytest.raises(ManifestError, match=r"1 row with a blank group, e.g. image_id 'nv_3'"):
        grouped_split(df)


def test_same_file_name_in_two_class_folders_gets_distinct_stable_ids_and_groups(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "img1.jpg", 1)
    _image(tmp_path / "b" / "img1.jpg", 2)
    _image(tmp_path / "b" / "ISIC_7.png", 3)
    df = ingest_class_folders(tmp_path)
    ids = dict(zip(df.image_id, df.label))
    assert ids == {"a/img1": "a", "b/img1": "b", "ISIC_7": "b"}  # unique stems keep the plain stem
    assert df.group.tolist() == df.image_id.tolist()
    assert ingest_class_folders(tmp_path).image_id.tolist() == df.image_id.tolist()  # stable across reads


def test_groups_file_uses_folder_ids_and_refuses_an_ambiguous_stem(tmp_path: Path) -> None:
    for label in ("a", "b"):
        _image(tmp_path / label / "img1.jpg")
    _image(tmp_path / "b" / "img2.jpg")
    (tmp_path / "groups.csv").write_text("image_id,group\nb/img1,P1\nimg2,P1\n")
    groups = ingest_class_folders(tmp_path).set_index("image_id").group.to_dict()
    assert groups == {"a/img1": "a/img1", "b/img1": "P1", "img2": "P1"}
    (tmp_path / "groups.csv").write_text("image_id,group\nimg1,P1\n")
    with pytest.raises(ManifestError, match=r"names image_id 'img1', which several class folders hold; .*'a/img1'"):
        ingest_class_folders(tmp_path)


# ------------------------------------------------------------------------------------------------ one-line errors


def test_empty_metadata_is_a_one_line_error_naming_the_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("")
    line = _cli_error(capsys, ["ingest", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert "metadata.csv' is empty; expected HAM10000 metadata with columns ['image_id', 'lesion_id', 'dx']" in line


def test_header_only_metadata_is_a_one_line_error_naming_the_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("image_id,lesion_id,dx\n")
    line = _cli_error(capsys, ["ingest", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert "metadata.csv' has a header but no rows" in line


def test_twelve_image_folder_says_how_many_groups_the_split_needs(tmp_path: Path, capsys) -> None:
    for i in range(12):
        _image(tmp_path / ("a" if i < 6 else "b") / f"img{i}.jpg", i)
    line = _cli_error(capsys, ["ingest", "--format", "folders", "--root", str(tmp_path),
                               "--out", str(tmp_path / "m.csv")])
    assert "12 images in 12 groups" in line and "15% grouped test split: it needs at least 7 groups" in line


def test_groups_file_without_group_column_names_the_column(tmp_path: Path, capsys) -> None:
    for i in range(4):
        _image(tmp_path / ("a" if i < 2 else "b") / f"img{i}.jpg", i)
    (tmp_path / "groups.csv").write_text("image_id,patient\nimg0,P1\n")
    line = _cli_error(capsys, ["ingest", "--format", "folders", "--root", str(tmp_path), "--no-split",
                               "--out", str(tmp_path / "m.csv")])
    assert "groups.csv' lacks columns ['group']" in line and "['image_id', 'patient']" in line


def test_console_prints_one_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--root", str(tmp_path), "--out",
                             str(tmp_path / "m.csv")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lesionlab ingest: error: '{tmp_path / 'metadata.csv'}' is empty; expected HAM10000 metadata with columns "
        "['image_id', 'lesion_id', 'dx']"
    ]
