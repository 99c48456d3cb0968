"""Model bundle: a directory with `weights.safetensors` and `card.json`; loading never unpickles code."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build_model

log = logging.getLogger(__name__)

CARD_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
OOD_FILE = "ood.safetensors"  # the out-of-distribution score's arrays, when the card has an `ood` block
EXPORTED_FILES = ("model.onnx", "model.int8.onnx")  # written by `lesionlab export` (pipelines.export)
REQUIRED_CARD_KEYS = ("architecture", "class_names", "input_size", "normalization")


@dataclass
class Bundle:
    """A loaded model and its card (architecture, classes, preprocessing, threshold, metrics, provenance)."""

    model: nn.Module
    card: dict[str, Any]
    path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    members: list["Bundle"] = field(default_factory=list)  # an ensemble's member bundles (empty otherwise)

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def malignant_classes(self) -> list[str]:
        return list(self.card.get("malignant_classes", []))

    @property
    def input_size(self) -> int:
        return int(self.card["input_size"])

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def operating_threshold(self) -> float | None:
        value = self.card.get("operating_threshold")
        return None if value is None else float(value)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_card(path: Path, card: dict[str, Any]) -> None:
    _atomic_write_bytes(path / CARD_FILE, json.dumps(card, indent=2, sort_keys=True, default=float).encode())


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle's numbers depend on."""
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "monai", "numpy", "lesionlab"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def save_bundle(
    path: str | Path, model: nn.Module, card: dict[str, Any], ood: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `model`'s weights and `card` into directory `path` (each file replaced atomically).

    `ood` holds the arrays of the card's `ood` block (out-of-distribution score). Without them the block is dropped:
    it was fitted on another network's features (a stage that copied the card of the bundle it changed).
    """
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}; a bundle needs {list(REQUIRED_CARD_KEYS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    card = {"format_version": CARD_FORMAT_VERSION, "versions": library_versions(), **card}
    if ood is None and card.pop("ood", None) is not None:
        log.info("bundle %s: the card's ood block is not carried over (its arrays were not given)", path)
    elif ood is not None and "ood" not in card:
        raise ValueError("out-of-distribution arrays were given but the card has no `ood` block describing them")
    elif ood:
        card["ood"] = {**card["ood"], "tensors": OOD_FILE}
    _write_ood_tensors(path, ood)
    # Exported files (ONNX) belong to the weights they were exported from: new weights start without them.
    if card.pop("export", None) is not None:
        log.info("bundle %s: the card's export block is not carried over (re-run `lesionlab export`)", path)
    for stale in EXPORTED_FILES:
        if (path / stale).exists():
            (path / stale).unlink()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{WEIGHTS_FILE}.")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS_FILE)
    _write_card(path, card)
    return path


def _write_ood_tensors(path: Path, tensors: dict[str, torch.Tensor] | None) -> None:
    """Write (or, for none, remove) the bundle's out-of-distribution arrays file atomically."""
    target = path / OOD_FILE
    if not tensors:
        if target.exists():
            target.unlink()
        return
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{OOD_FILE}.")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, target)


def write_ood(path: str | Path, block: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Add (or replace) the out-of-distribution score of an existing single-network bundle: its arrays file and the
    card's `ood` block; every other card entry stays as it is."""
    path = Path(path)
    card = read_card(path)
    if ENSEMBLE in card:
        raise ValueError(f"'{path}' is an ensemble bundle; add the out-of-distribution score to its first member")
    card["ood"] = {**block, "tensors": OOD_FILE} if tensors else dict(block)
    _write_ood_tensors(path, tensors)
    _write_card(path, card)
    return path


def update_card(path: str | Path, **blocks: Any) -> dict[str, Any]:
    """Set top-level blocks of an existing bundle's card (written atomically); every other entry stays."""
    path = Path(path)
    card = {**read_card(path), **blocks}
    _write_card(path, card)
    return card


def load_ood(path: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The arrays of a card's `ood` block ({} when it has none or needs none); a missing file is an error."""
    block = card.get("ood")
    if not block or not block.get("tensors"):
        return {}
    name = block["tensors"]
    if Path(name).name != name:
        raise ValueError(f"bundle '{path}' names out-of-distribution arrays '{name}' outside its own folder")
    if not (path / name).is_file():
        raise FileNotFoundError(f"bundle '{path}' has an `ood` block in its card but no {name}; copy the file with "
                                "the bundle or remove the block")
    return load_file(path / name, device="cpu")


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and check a bundle's `card.json`."""
    path = Path(path)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"'{path}' is not a model bundle: it has no {CARD_FILE}")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{card_path}' is not valid JSON: {err}") from err
    missing = [key for key in REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"'{card_path}' lacks {missing}")
    return card


def build_from_card(card: dict[str, Any]) -> nn.Module:
    """Rebuild the (possibly pruned) network a card describes, with random weights."""
    arch = card["architecture"]
    kwargs = dict(arch.get("kwargs", {}))
    kwargs.pop("pretrained", None)  # the bundle's own weights replace any initialisation
    model = build_model(arch["name"], num_classes=len(card["class_names"]), img_size=card["input_size"], **kwargs)
    if arch.get("channel_plan"):
        from models.pruned import apply_channel_plan

        apply_channel_plan(model, arch["channel_plan"])
    return model


ENSEMBLE = "ensemble"


def save_ensemble(path: str | Path, members: list[tuple[nn.Module, dict[str, Any]]], card: dict[str, Any]) -> Path:
    """Write an ensemble bundle: one folder, one card, each member a bundle in `member_<i>/`.

    The ensemble's probabilities are the mean of its members' calibrated (and test-time-augmented) probabilities;
    `card` holds what is true of the whole (classes, threshold, metrics). Every member must share its class names.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    names = [list(member_card["class_names"]) for _, member_card in members]
    if any(n != names[0] for n in names):
        raise ValueError(f"ensemble members disagree on their classes: {names}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    folders = []
    for i, (model, member_card) in enumerate(members):
        save_bundle(path / f"member_{i}", model, member_card)
        folders.append(f"member_{i}")
    first = members[0][1]
    whole = {
        "architecture": {"name": ENSEMBLE, "members": [c["architecture"]["name"] for _, c in members]},
        "class_names": names[0],
        "input_size": max(int(c["input_size"]) for _, c in members),
        "normalization": first["normalization"],
        "malignant_classes": first.get("malignant_classes", []),
        "task": "image",
        **{key: first[key] for key in ("data_license", "intended_use") if key in first},
        **card,
        "ensemble": {"members": folders, "combine": "mean of the members' calibrated probabilities"
                     + (", then the card's calibration on its log" if card.get("calibration") else "")},
    }
    missing = [key for key in REQUIRED_CARD_KEYS if key not in whole]
    if missing:
        raise ValueError(f"ensemble card lacks {missing}")
    whole = {"format_version": CARD_FORMAT_VERSION, "versions": library_versions(), **whole}
    _write_card(path, whole)
    stale = path / WEIGHTS_FILE  # an ensemble folder holds no weights of its own
    if stale.exists():
        stale.unlink()
    return path


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory: rebuild the network from its card, then load safetensors weights strictly."""
    path = Path(path)
    card = read_card(path)
    if ENSEMBLE in card:
        folders = card[ENSEMBLE].get("members", [])
        if len(folders) < 2:
            raise ValueError(f"ensemble bundle '{path}' lists {len(folders)} members; at least 2 are required")
        members = []
        for folder in folders:
            if Path(folder).is_absolute() or ".." in Path(folder).parts:
                raise ValueError(f"ensemble bundle '{path}' names member '{folder}' outside its own folder")
            members.append(load_bundle(path / folder, device))
        return Bundle(model=members[0].model, card=card, path=path, members=members)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model bundle '{path}' has no {WEIGHTS_FILE}")
    model = build_from_card(card)
    model.load_state_dict(load_file(weights, device="cpu"), strict=True)
    model.to(device).eval()
    ood = load_ood(path, card)
    return Bundle(model=model, card=card, path=path, extras={"ood": ood} if ood else {})
