"""Manifest readers, the grouped split and the leakage guards."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pipelines.manifest import (
    ManifestError,
    append_train_rows,
    check_no_group_leakage,
    grouped_split,
    ingest_class_folders,
    ingest_ham10000,
    read_manifest,
    write_manifest,
)
from tests.conftest import HAM_SAMPLE


def test_ham10000_reader_finds_every_sample_image_with_metadata():
    df = ingest_ham10000(HAM_SAMPLE)
    assert len(df) == 1000
    assert set(df.label) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert df.group.str.startswith("HAM_").all()
    assert (df.malignant == df.label.isin(["mel", "bcc", "akiec"]).astype(int)).all()
    assert {"age", "sex", "localization", "dx_type"} <= set(df.columns)


def test_no_lesion_is_in_two_splits(ham_manifest):
    spread = ham_manifest.groupby("group").split.nunique()
    assert spread.max() == 1
    check_no_group_leakage(ham_manifest)


def test_leakage_check_fails_when_a_group_spans_splits(ham_manifest):
    leaky = ham_manifest.copy()
    group = leaky.group.iloc[0]
    extra = leaky.iloc[[0]].assign(split="test" if leaky.split.iloc[0] != "test" else "train")
    leaky = pd.concat([leaky, extra])
    with pytest.raises(ManifestError, match=group):
        check_no_group_leakage(leaky)


def test_grouped_split_keeps_multi_image_lesions_together_and_is_seeded():
    df = ingest_ham10000(HAM_SAMPLE)
    # Fold the sample into lesions of ~3 images each, as in the full HAM10000 (several images per lesion).
    df["group"] = [f"L{i // 3}" for i in range(len(df))]
    a = grouped_split(df, 0.2, 0.2, seed=3)
    b = grouped_split(df, 0.2, 0.2, seed=3)
    c = grouped_split(df, 0.2, 0.2, seed=4)
    assert (a.split == b.split).all()
    assert (a.split != c.split).any()
    assert a.groupby("group").split.nunique().max() == 1
    share = a.split.value_counts(normalize=True)
    assert 0.12 < share["test"] < 0.28 and 0.12 < share["val"] < 0.28
    for label, rows in a.groupby("label"):  # stratified: every class in every split
        assert set(rows.split) == {"train", "val", "test"}, label


def test_class_folder_reader(tmp_path):
    for label, ids in {"benign": ["ISIC_0024306", "ISIC_0024307"], "malignant": ["ISIC_0024310"]}.items():
        (tmp_path / label).mkdir()
        for image_id in ids:
            src = next((HAM_SAMPLE / "images").glob("*.jpg"))
            shutil.copy(src, tmp_path / label / f"{image_id}.jpg")
    (tmp_path / "groups.csv").write_text("image_id,group\nISIC_0024306,P1\nISIC_0024307,P1\n")
    df = ingest_class_folders(tmp_path)
    assert sorted(df.label) == ["benign", "benign", "malignant"]
    assert df.set_index("image_id").group.to_dict() == {
        "ISIC_0024306": "P1",
        "ISIC_0024307": "P1",
        "ISIC_0024310": "ISIC_0024310",
    }


def test_missing_metadata_columns_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("image_id,dx\nx,nv\n")
    with pytest.raises(ManifestError, match=r"lesion_id"):
        ingest_ham10000(tmp_path)


def test_manifest_round_trip_and_relative_paths(ham_manifest, tmp_path):
    path = write_manifest(ham_manifest.head(20), tmp_path / "m.csv")
    back = read_manifest(path)
    assert back.image_id.tolist() == ham_manifest.head(20).image_id.tolist()
    rel = ham_manifest.head(2).copy()
    (tmp_path / "imgs").mkdir()
    for p in rel.path:
        shutil.copy(p, tmp_path / "imgs")
    rel["path"] = ["imgs/" + p.split("/")[-1] for p in rel.path]
    write_manifest(rel, tmp_path / "rel.csv")
    assert all(p.startswith(str(tmp_path)) for p in read_manifest(tmp_path / "rel.csv").path)


def test_appending_rows_touches_train_only_and_refuses_other_splits(ham_manifest):
    new = pd.DataFrame({"image_id": ["syn_1"], "path": ["/x/syn_1.png"], "label": ["df"], "source": ["synthetic"]})
    combined = append_train_rows(ham_manifest, new)
    assert len(combined) == len(ham_manifest) + 1
    assert combined.iloc[-1].split == "train"
    held_out = ham_manifest.split.isin(["val", "test"])
    before = ham_manifest[held_out].to_csv(index=False)
    after = combined.iloc[: len(ham_manifest)][held_out.values].to_csv(index=False)
    assert after == before  # validation and test rows byte-identical
    with pytest.raises(ManifestError, match="split=train"):
        append_train_rows(ham_manifest, new.assign(split="test"))
