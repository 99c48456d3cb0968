"""The clinician web app (Gradio Blocks): single image with explanation, batch table + CSV, optional pathology tab."""

from __future__ import annotations

import atexit
import heapq
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.wording import (
    card_markdown,
    class_name,
    performance_markdown,
    probabilities_markdown,
    probability_text,
    referral_decision,
    referral_html,
    scope_warnings,
    warnings_html,
)
from models.bundle import Bundle, load_bundle, read_card
from pipelines.images import ImageError, ImageLimits, load_image
from pipelines.prediction import Predictor

# Offline and private before gradio is first imported (inside the functions below): no analytics, no hub telemetry.
for _name, _value in {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}.items():
    os.environ.setdefault(_name, _value)

log = logging.getLogger(__name__)

INTENDED_USE = (
    "**Research use only. Not a diagnostic device.** lesionlab is a research prototype: it has not been cleared or "
    "approved by any regulator, and its output must not be used to diagnose, treat or triage patients. Every "
    "result below needs a clinician's own examination and judgement."
)
API_SINGLE = "classify"
API_BATCH = "classify_batch"
API_CARD = "model_card"
# Tables keep whole words (the ABCD readout on a 390 px phone) and scroll sideways instead.
APP_CSS = """
#abcd table, #probabilities table { display: block; overflow-x: auto; }
#abcd td, #abcd th, #probabilities td, #probabilities th { word-break: normal; overflow-wrap: normal; hyphens: none; }
"""


@dataclass(frozen=True)
class ServeSettings:
    """What `lesionlab serve` can configure: request concurrency, input limits and how long files live."""

    concurrency: int = 2
    max_file_mb: float = 25.0
    max_megapixels: float = 50.0
    max_batch_files: int = 200
    queue_size: int = 256
    # An upload is deleted this long after the last request using it ends. Identical uploads share one file in
    # Gradio's cache, so the grace must cover an identical upload's wait in the queue.
    upload_grace_s: float = 15.0
    output_max_age_s: int = 900  # heat-maps and CSVs handed to the browser are deleted after this
    session_ttl_s: int = 1800  # the last uploaded image kept in memory (for switching models) per browser session
    tta: int | None = None  # test-time-augmentation views; None: what each bundle was validated with
    engine: str = "auto"  # network runtime (pipelines.export): auto runs a bundle's exported ONNX file when it has one
    auth_file: str | None = None  # login file (app.auth); None: no login
    audit_log: str | None = None  # JSON-lines audit file (app.ops), one line per analysis; None: no audit log
    metrics_token_file: str | None = None  # bearer token for GET /metrics; needed for /metrics when logins are on
    header_timeout_s: float | None = 15.0  # close connections whose request headers are not complete by then

    def limits(self, min_side: int = 32) -> ImageLimits:
        """The image limits these settings describe."""
        return ImageLimits(
            max_bytes=int(self.max_file_mb * 2**20), max_pixels=int(self.max_megapixels * 1e6), min_side=min_side
        )


# --------------------------------------------------------------------------------------------- models


def discover_bundles(models_dir: str | Path) -> dict[str, Path]:
    """Bundle folders by name: `models_dir` itself if it is a bundle, else its sub-folders holding a card.json."""
    models_dir = Path(models_dir)
    if (models_dir / "card.json").is_file():
        return {models_dir.name: models_dir}
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models folder '{models_dir}' does not exist; expected a folder of model bundles")
    found = {p.name: p for p in sorted(models_dir.iterdir()) if p.is_dir() and (p / "card.json").is_file()}
    if not found:
        raise FileNotFoundError(
            f"no model bundle in '{models_dir}'; expected a bundle folder (weights.safetensors + card.json) "
            "or a folder of such bundles"
        )
    return found


@dataclass
class ServedModel:
    """One image-classification bundle, loaded once: its predictor and explainer share nothing mutable."""

    name: str
    bundle: Bundle
    predictor: Predictor
    explainer: Any

    @property
    def card(self) -> dict[str, Any]:
        return self.bundle.card


def load_models(models_dir: str | Path, settings: ServeSettings) -> tuple[dict[str, ServedModel], dict[str, Bundle]]:
    """Load every bundle in `models_dir` once: (image classifiers by name, MIL bundles by name)."""
    from app.explain import Explainer

    images: dict[str, ServedModel] = {}
    mil: dict[str, Bundle] = {}
    for name, path in discover_bundles(models_dir).items():
        card = read_card(path)
        bundle = load_bundle(path)
        if card.get("task", "image") == "mil":
            mil[name] = bundle
            continue
        limits = settings.limits(min_side=int(card.get("min_input_side", 32)))
        predictor = Predictor(bundle, limits=limits, tta=settings.tta, engine=settings.engine)
        images[name] = ServedModel(name, bundle, predictor, Explainer(bundle))
        log.info("loaded model '%s' (%s, %d px, %d classes, %s)", name, card["architecture"]["name"],
                 bundle.input_size, len(bundle.class_names), predictor.engine)
    return images, mil


# --------------------------------------------------------------------------------------------- temporary files


class FileJanitor:
    """Deletes uploads soon after the last request that uses them, and our own output files after a while.

    Gradio stores an upload at `<cache>/<sha256 of content>/<name>`, so identical uploads share one file: an upload
    is deleted `grace_s` after the last request holding it ends (a reference count and a due time per path), and
    not at all when an identical upload has replaced the file since (that upload's request deletes it).
    One background thread does every deletion.
    """

    def __init__(self, root: str | Path, grace_s: float) -> None:
        self.root = Path(root).resolve()
        self.grace_s = grace_s
        self._holds: dict[Path, int] = {}
        self._inodes: dict[Path, int] = {}  # the file each upload path held when a request last took it
        self._due: dict[Path, float] = {}
        self._queue: list[tuple[float, str]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            return False
        return True

    def hold(self, paths: Sequence[str | Path]) -> list[Path]:
        """Mark uploads as in use; paths outside the upload cache (a local caller's own files) are never touched."""
        held = [Path(p).resolve() for p in paths if p and self._inside(Path(p))]
        with self._wake:
            for path in held:
                self._holds[path] = self._holds.get(path, 0) + 1
                try:
                    self._inodes[path] = path.stat().st_ino
                except OSError:
                    self._inodes.pop(path, None)
        return held

    def release(self, held: Sequence[Path], grace_s: float | None = None) -> None:
        """End a request's use of `held`; each file is deleted once no request has held it for `grace_s` (default:
        the janitor's)."""
        with self._wake:
            for path in held:
                self._holds[path] = max(0, self._holds.get(path, 1) - 1)
        for path in held:
            self.delete_later(path, self.grace_s if grace_s is None else grace_s)

    def delete_later(self, path: str | Path, delay_s: float) -> None:
        """Delete `path` (and its folder, if left empty) in `delay_s` seconds, unless a request holds it then."""
        path = Path(path).resolve()
        due = time.monotonic() + max(0.0, delay_s)
        with self._wake:
            self._due[path] = max(due, self._due.get(path, 0.0))
            heapq.heappush(self._queue, (due, str(path)))
            if delay_s > 0 and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lesionlab-janitor", daemon=True)
                self._thread.start()
            self._wake.notify()
        if delay_s <= 0:
            self._sweep()

    def _run(self) -> None:
        while True:
            with self._wake:
                wait = self._queue[0][0] - time.monotonic() if self._queue else None
                if wait is None or wait > 0:
                    self._wake.wait(timeout=wait)
            self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._wake:
            while self._queue and self._queue[0][0] <= now:
                path = Path(heapq.heappop(self._queue)[1])
                if self._holds.get(path, 0) > 0 or self._due.get(path, 0.0) > now:
                    continue  # in use again, or a later deletion is scheduled
                self._due.pop(path, None)
                self._holds.pop(path, None)
                self._remove(path, self._inodes.pop(path, None))

    def _remove(self, path: Path, inode: int | None) -> None:
        try:
            if inode is not None and path.stat().st_ino != inode:
                return  # an identical upload replaced the file after our request took it: its request owns it
            path.unlink()
            if path.parent != self.root and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError as err:  # already gone, or re-created meanwhile
            log.debug("temporary file not deleted: %s", err)


# --------------------------------------------------------------------------------------------- scratch folders

OUTPUT_PREFIX, GRADIO_PREFIX = "lesionlab-out-", "lesionlab-gradio-"
_SCRATCH = re.compile(rf"^(?:{OUTPUT_PREFIX}|{GRADIO_PREFIX})(\d+)-")


def scratch_dir(prefix: str) -> Path:
    """A private (0700) temporary folder named after this process, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_leftovers(root: str | Path | None = None) -> int:
    """Delete the scratch folders of server processes that no longer run (a killed server); returns how many."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    for entry in root.iterdir() if root.is_dir() else []:
        found = _SCRATCH.match(entry.name)
        if found and entry.is_dir() and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------- the service


@dataclass
class LesionService:
    """Everything a request needs: the loaded models, the input limits and the file janitor (thread-safe)."""

    models: dict[str, ServedModel]
    settings: ServeSettings
    janitor: FileJanitor
    mil_bundles: dict[str, Bundle] = field(default_factory=dict)
    output_dir: Path = field(default_factory=lambda: scratch_dir(OUTPUT_PREFIX))

    def model(self, name: str | None) -> ServedModel:
        """The served model called `name` (the first one when empty)."""
        if not name:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ValueError(f"unknown model '{name}'; expected one of {sorted(self.models)}")
        return self.models[name]

    def decode(self, path: str | Path, model: ServedModel) -> Image.Image:
        """Decode an uploaded file with the shared safe decoder (limits, EXIF orientation, mode conversion)."""
        path = Path(path)
        if not path.is_file():
            raise ImageError(
                f"the uploaded file '{path.name}' is no longer on the server (uploads are deleted after analysis); "
                "please upload it again"
            )
        return load_image(path, model.predictor.limits, name=path.name)

    def analyse(self, image: Image.Image, model: ServedModel) -> dict[str, Any]:
        """Probabilities, malignancy vs threshold, explanation heat-map and ABCD readout for one RGB image."""
        from app.explain import explanation_markdown
        from app.readout import abcd_readout, outline_image
        from app.wording import ood_warnings

        start = time.perf_counter()
        probs, ood_scores = model.predictor.predict_with_ood([image])
        probs = probs[0]
        p_malignant = float(model.predictor.malignant_probability(probs[None])[0])
        predicted = int(probs.argmax())
        explanation = model.explainer.explain(image, predicted)
        readout, mask = abcd_readout(image)
        card = model.card
        threshold = card.get("operating_threshold")
        p_value = None if np.isnan(p_malignant) else p_malignant
        probabilities = {c: float(p) for c, p in zip(model.predictor.class_names, probs, strict=True)}
        explained = model.predictor.class_names[predicted]
        decision = referral_decision(p_value, card)
        warnings = scope_warnings(*image.size, model.bundle.input_size)
        ood = None
        if ood_scores is not None:
            score, flagged = float(ood_scores[0]), bool(model.predictor.ood_flags(ood_scores)[0])
            ood = {"score": score, "threshold": model.predictor.ood.threshold, "flagged": flagged}
            warnings += ood_warnings(score, model.predictor.ood.block)
        details = {
            "model": model.name,
            "model_version": card.get("model_version"),
            "referral": decision,
            "predicted": explained,
            "probabilities": probabilities,
            "prob_malignant": p_value,
            "operating_threshold": threshold,
            "above_threshold": None if threshold is None or p_value is None else bool(p_value >= threshold),
            "threshold_metrics": {k: v for k, v in (card.get("threshold_metrics") or {}).items()
                                  if k in ("sensitivity", "specificity")},
            "explanation": {"method": explanation.method, "class": explained},
            "abcd": readout,
            "warnings": warnings,
            "ood": ood,  # None for a bundle without an out-of-distribution score
        }
        log.info("analysed one image with '%s' in %.0f ms", model.name, 1000 * (time.perf_counter() - start))
        return {
            "details": details,
            "referral": warnings_html(warnings) + referral_html(p_value, card),
            "probabilities": probabilities_markdown(probabilities) + "\n\n" + performance_markdown(card),
            "heatmap": explanation.overlay(),
            "heat_note": explanation_markdown(class_name(explained), explanation.method),
            "outline": outline_image(image, mask),
        }

    def save_output(self, image: Image.Image, name: str) -> str:
        """Write an image for the browser as a PNG without metadata, under a fresh folder (deleted later)."""
        folder = Path(tempfile.mkdtemp(prefix="out-", dir=self.output_dir))
        path = folder / f"{name}.png"
        clean = Image.new("RGB", image.size)
        clean.paste(image.convert("RGB"))  # a new image: no EXIF, ICC profile or text chunks can come along
        clean.save(path, format="PNG")
        # Gradio copies it into its own cache when the request returns; its copy is deleted by `delete_cache`.
        self.janitor.delete_later(path, 120.0)
        return str(path)

    def batch(self, paths: Sequence[str | Path], model: ServedModel) -> tuple[Any, Path, list[str]]:
        """(table for the screen, CSV path, skipped-file messages); the CSV has the columns of `lesionlab predict`."""
        if len(paths) > self.settings.max_batch_files:
            raise ImageError(f"{len(paths)} files were sent; at most {self.settings.max_batch_files} per batch")
        images, ids, skipped = [], [], []
        for path in paths:
            try:
                images.append(self.decode(path, model))
                ids.append(Path(path).stem)
            except ImageError as err:
                skipped.append(str(err))
        probs, ood_scores = model.predictor.predict_with_ood(images)
        table = model.predictor.table(ids, probs)
        folder = Path(tempfile.mkdtemp(prefix="batch-", dir=self.output_dir))
        csv = folder / "lesionlab_predictions.csv"
        table.to_csv(csv, index=False, float_format="%.6f")
        self.janitor.delete_later(csv, self.settings.output_max_age_s)
        log.info("batch of %d files with '%s': %d predicted, %d skipped", len(paths), model.name, len(table),
                 len(skipped))
        shown = batch_display(table, model.predictor.class_names, model.card, model.predictor.ood_flags(ood_scores))
        return shown, csv, skipped


def batch_display(table: Any, class_names: Sequence[str], card: dict[str, Any], ood_flags: Any = None) -> Any:
    """The prediction table as the screen shows it: the referral first, percentages (one decimal, so the columns
    sort as numbers), full diagnosis names; with `ood_flags`, an `ood_flag` column (True: unlike the training
    images)."""
    import pandas as pd

    shown = pd.DataFrame({"image": table["image_id"]})
    p_malignant = table["prob_malignant"].astype(float)
    shown["referral"] = [referral_decision(None if np.isnan(p) else float(p), card) for p in p_malignant]
    shown["P(malignant) %"] = (100 * p_malignant).round(1)
    shown["most likely"] = [class_name(c) for c in table["pred_label"]]
    shown["its probability"] = [probability_text(float(table.loc[i, f"prob_{c}"]))
                                for i, c in zip(table.index, table["pred_label"], strict=True)]
    if ood_flags is not None:
        shown["ood_flag"] = [bool(flag) for flag in ood_flags]
    for c in class_names:
        shown[f"{class_name(c)} %"] = (100 * table[f"prob_{c}"].astype(float)).round(1)
    return shown


def _file_path(value: Any) -> str | None:
    """The server-side path of a gr.File / gr.Image value (a str, a NamedString or a dict with 'path')."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return str(value)


# --------------------------------------------------------------------------------------------- the app


def build_app(
    bundles_dir: str | Path,
    settings: ServeSettings | None = None,
    models: dict[str, ServedModel] | None = None,
    mil_bundles: dict[str, Bundle] | None = None,
):
    """The Gradio Blocks app over every bundle in `bundles_dir` (loaded once, unless `models` are passed in)."""
    import gradio as gr

    from pipelines.captions import DIAGNOSIS_NAMES  # noqa: F401 - fail early if the wording tables are missing

    settings = settings or ServeSettings()
    if models is None:
        models, mil_bundles = load_models(bundles_dir, settings)
    mil_bundles = mil_bundles or {}
    if not models and not mil_bundles:
        raise FileNotFoundError(f"'{bundles_dir}' holds no usable model bundle")
    from gradio.utils import get_upload_folder

    service = LesionService(models, settings, FileJanitor(get_upload_folder(), settings.upload_grace_s), mil_bundles)
    from app.ops import Ops, referral_counts, with_request

    served = {name: bundle.card.get("model_version") for name, bundle in mil_bundles.items()}
    ops = Ops({**served, **{name: m.card.get("model_version") for name, m in models.items()}}, settings.audit_log)
    names = list(models)
    default = "default_bundle" if "default_bundle" in models else (names[0] if names else None)

    def _fail(err: Exception) -> gr.Error:
        # The message names the user's own file; it goes to the user only, never to the server log.
        log.info("rejected an upload (%s)", type(err).__name__)
        return gr.Error(str(err), duration=None, title="This file cannot be analysed", print_exception=False)

    def _single_outputs(result: dict[str, Any]) -> tuple:
        # Images are handed over as our own files: Gradio writes PIL outputs to a content-addressed cache path
        # non-atomically, which breaks identical answers served at the same time.
        return (result["referral"], result["probabilities"], service.save_output(result["heatmap"], "heatmap"),
                result["heat_note"], service.save_output(result["outline"], "outline"),
                _readout_md(result["details"]["abcd"]), result["details"])

    def _readout_md(readout: dict[str, Any]) -> str:
        from app.readout import readout_markdown

        return readout_markdown(readout)

    @with_request
    def classify(image_file: Any, model_name: str | None, request: Any = None) -> tuple:
        """Classify one uploaded image: probabilities, malignancy vs threshold, heat-map, ABCD readout, details."""
        path = _file_path(image_file)
        if not path:
            raise gr.Error("no image was received; upload a JPEG, PNG, TIFF, BMP, WebP or DICOM file",
                           print_exception=False)
        with ops.observe(API_SINGLE, model_name, request) as call:
            held = service.janitor.hold([path])
            try:
                model = service.model(model_name)
                call.model = model.name
                image = service.decode(path, model)
                result = service.analyse(image, model)
            except (ImageError, ValueError) as err:
                call.fail(err)
                raise _fail(err) from None
            finally:
                service.janitor.release(held)
            call.referral = result["details"]["referral"]
            return (*_single_outputs(result), image)

    @with_request
    def reanalyse(image: Image.Image | None, model_name: str | None, request: Any = None) -> tuple:
        """Re-run the last uploaded image (kept in this session's memory) with another model."""
        if image is None:
            return ("", "", None, "", None, "", None)
        with ops.observe("reanalyse", model_name, request) as call:
            try:
                model = service.model(model_name)
                call.model = model.name
                result = service.analyse(image, model)
            except ValueError as err:
                call.fail(err)
                raise _fail(err) from None
            call.referral = result["details"]["referral"]
            return _single_outputs(result)

    @with_request
    def classify_batch(files: list[Any] | None, model_name: str | None, request: Any = None) -> tuple:
        """Classify several images: the `lesionlab predict` table, its CSV and the files that were skipped."""
        paths = [p for p in (_file_path(f) for f in (files or [])) if p]
        if not paths:
            raise gr.Error("no files were received; select one or more images", print_exception=False)
        with ops.observe(API_BATCH, model_name, request) as call:
            call.n_images = len(paths)
            held = service.janitor.hold(paths)
            try:
                model = service.model(model_name)
                call.model = model.name
                table, csv, skipped = service.batch(paths, model)
            except (ImageError, ValueError) as err:
                call.fail(err)
                raise _fail(err) from None
            finally:
                # Kept while the page may press "Classify all" again (e.g. with another model), then deleted.
                service.janitor.release(held, grace_s=settings.output_max_age_s)
            call.referral, call.n_skipped = referral_counts(table["referral"]), len(skipped)
        note = f"{len(table)} of {len(paths)} images classified."
        if skipped:
            note += "\n\n**Skipped:**\n" + "\n".join(f"- {message}" for message in skipped)
        return table, str(csv), note

    @with_request
    def model_card(model_name: str | None, request: Any = None) -> str:
        """The model card summary of one served model."""
        with ops.observe(API_CARD, model_name, request, audit=False) as call:
            call.n_images = 0
            try:
                model = service.model(model_name)
            except ValueError as err:
                call.fail(err)
                raise gr.Error(str(err), print_exception=False) from None
            call.model = model.name
            return card_markdown(model.name, model.card)

    def clear_single() -> tuple:
        return ("", "", None, "", None, "", None, None)

    file_types_note = "JPEG, PNG, TIFF, BMP, WebP or single-frame DICOM, at most " \
        f"{settings.max_file_mb:g} MB and {settings.max_megapixels:g} megapixels"
    with gr.Blocks(title="lesionlab", analytics_enabled=False,
                   delete_cache=(60, max(60, settings.output_max_age_s))) as demo:
        gr.Markdown("# lesionlab: skin lesion classifier with explanations")
        gr.Markdown(INTENDED_USE, elem_id="intended-use")
        with gr.Tabs():
            if models:
                with gr.Tab("Single image", id="single"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            model_box = gr.Dropdown(names, value=default, label="Model", elem_id="model")
                            with gr.Tabs():
                                with gr.Tab("Upload a file"):
                                    upload = gr.File(label=f"Dermoscopy image ({file_types_note}); drag and drop "
                                                     "or click to choose", type="filepath", elem_id="upload")
                                with gr.Tab("Webcam"):
                                    webcam = gr.Image(sources=["webcam"], type="filepath", image_mode=None,
                                                      label="Take a photo", elem_id="webcam")
                        with gr.Column(scale=2):
                            referral = gr.HTML(label="Referral", elem_id="referral")
                            probabilities = gr.Markdown(label="Diagnosis probabilities", elem_id="probabilities")
                            with gr.Row():
                                heatmap = gr.Image(label="Explanation heat-map", type="filepath", format="png",
                                                   interactive=False, height=354, elem_id="heatmap")
                                outline = gr.Image(label="Lesion outline used for the ABCD readout", type="filepath",
                                                   format="png", interactive=False, height=354,
                                                   elem_id="outline")
                            heat_note = gr.Markdown(elem_id="heat-note")
                            readout = gr.Markdown(label="ABCD readout", elem_id="abcd")
                            with gr.Accordion("Details (JSON)", open=False):
                                details = gr.JSON(label="details", elem_id="details")
                    # Below the result on every screen: on a phone the columns stack and the result comes first.
                    card_box = gr.Markdown(card_markdown(default, models[default].card), label="model card",
                                           elem_id="card")
                    image_state = gr.State(None, time_to_live=settings.session_ttl_s)
                    single_outputs = [referral, probabilities, heatmap, heat_note, outline, readout, details]
                    for source, event in ((upload, upload.upload), (webcam, webcam.input)):
                        event(clear_single, None, [*single_outputs, image_state], queue=False,
                              api_visibility="private").then(
                            classify, [source, model_box], [*single_outputs, image_state],
                            api_name=API_SINGLE if source is upload else "classify_webcam",
                            api_visibility="public" if source is upload else "private",
                        )
                    upload.clear(clear_single, None, [*single_outputs, image_state], queue=False,
                                 api_visibility="private")
                    model_box.change(model_card, [model_box], [card_box], api_name=API_CARD).then(
                        reanalyse, [image_state, model_box], single_outputs, api_visibility="private"
                    )

                with gr.Tab("Batch", id="batch"):
                    with gr.Row():
                        batch_model = gr.Dropdown(names, value=default, label="Model", elem_id="batch-model")
                        batch_files = gr.File(label=f"Images ({file_types_note} each)", file_count="multiple",
                                              type="filepath", elem_id="batch-files")
                    batch_button = gr.Button("Classify all", variant="primary", elem_id="batch-run")
                    batch_note = gr.Markdown(label="skipped files", elem_id="batch-note")
                    batch_table = gr.Dataframe(label="Predictions", interactive=False, elem_id="batch-table")
                    batch_csv = gr.File(label="Download CSV (same columns as `lesionlab predict`)",
                                        elem_id="batch-csv")
                    batch_button.click(classify_batch, [batch_files, batch_model],
                                       [batch_table, batch_csv, batch_note], api_name=API_BATCH)
            if mil_bundles and importlib.util.find_spec("app.pathology") is not None:
                from app.pathology import build_pathology_tab

                # the image tabs' file limits, and the app's janitor (uploads deleted after each request)
                build_pathology_tab(mil_bundles, janitor=service.janitor, limits=settings.limits(), ops=ops)
            elif mil_bundles:
                log.warning("MIL bundles %s found but app.pathology is not available; no pathology tab",
                            sorted(mil_bundles))
        minutes = max(1, round(settings.output_max_age_s / 60))
        gr.Markdown("_No image, result or usage data leaves this machine. A single uploaded image is deleted from the "
                    f"server within a minute of its analysis, batch files and results within {minutes} minutes, and "
                    "everything left when the server stops; nothing you upload is written to the server log._")
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.lesionlab_service = service  # for tests and benchmarks: the janitor and loaded models
    demo.lesionlab_ops = ops  # metrics and audit log; launch() serves them at /metrics
    return demo


def health(service: LesionService) -> dict[str, Any]:
    """What GET /healthz answers: a tiny JSON with the status, the loaded models and the software version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        software = version("lesionlab")
    except PackageNotFoundError:
        software = "unknown"
    return {
        "status": "ok",
        "models": {name: model.card.get("model_version") for name, model in service.models.items()},
        "pathology_models": sorted(service.mil_bundles),
        "version": software,
    }


def launch(demo: Any, host: str, port: int, settings: ServeSettings, block: bool = True) -> Any:
    """Start the server (no share link, no SSR, API open to gradio_client) with GET /healthz and GET /metrics, close
    connections whose request headers are late, and return the Blocks."""
    from fastapi.responses import JSONResponse

    from app.auth import LoginChecker
    from app.ops import HeaderTimeout, add_metrics_route, read_token

    auth = LoginChecker(settings.auth_file) if settings.auth_file else None
    metrics_token = read_token(settings.metrics_token_file) if settings.metrics_token_file else None
    if auth is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a login: anyone who can reach this address can use the app and its API; "
                    "set --auth-file (or LESIONLAB_AUTH_FILE) on a shared network", host)
    demo.launch(
        auth=auth,
        auth_message="lesionlab: sign in with the account your administrator gave you." if auth else None,
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        ssr_mode=False,
        css=APP_CSS,
        max_file_size=int(2 * settings.max_file_mb * 2**20),  # our decoder names anything between the two limits
        prevent_thread_lock=True,
        quiet=True,
    )
    service = demo.lesionlab_service
    demo.app.add_api_route("/healthz", lambda: JSONResponse(health(service), headers={"Cache-Control": "no-store"}),
                           methods=["GET"], include_in_schema=False)
    ops = demo.lesionlab_ops
    add_metrics_route(demo.app, ops, metrics_token, login_required=auth is not None)
    if settings.header_timeout_s:
        HeaderTimeout(demo.server, settings.header_timeout_s, on_close=ops.header_timeouts.inc).start()
    if block:
        demo.block_thread()
    return demo


def _private_gradio_dir() -> None:
    """Give Gradio's upload cache a private folder (0700) removed at exit, unless GRADIO_TEMP_DIR is set."""
    if os.environ.get("GRADIO_TEMP_DIR"):
        return
    os.environ["GRADIO_TEMP_DIR"] = str(scratch_dir(GRADIO_PREFIX))


def _exit_on_sigterm() -> None:
    """`docker stop` and service managers send SIGTERM: exit as on Ctrl-C, so the exit clean-up runs."""
    import signal

    def _stop(signum, _frame):
        log.info("stopping (signal %d); removing uploads and outputs", signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)


def settings_from_args(args: Any) -> ServeSettings:
    """The ServeSettings that `lesionlab serve` flags describe (checked)."""
    header_timeout = getattr(args, "header_timeout", 15.0)
    settings = ServeSettings(
        concurrency=int(getattr(args, "concurrency", 2)),
        max_file_mb=float(getattr(args, "max_file_mb", 25.0)),
        max_megapixels=float(getattr(args, "max_megapixels", 50.0)),
        tta=getattr(args, "tta", None),
        engine=getattr(args, "engine", "auto"),
        auth_file=getattr(args, "auth_file", None),
        audit_log=getattr(args, "audit_log", None) or None,
        metrics_token_file=getattr(args, "metrics_token_file", None) or None,
        header_timeout_s=float(header_timeout) if header_timeout else None,
    )
    if settings.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {settings.concurrency}")
    if settings.header_timeout_s is not None and settings.header_timeout_s < 0:
        raise ValueError(f"--header-timeout must be positive seconds (0 turns it off), got {header_timeout}")
    return settings


def serve_cli(args: Any) -> None:
    """`lesionlab serve`: load the bundles once and serve the app until interrupted."""
    settings = settings_from_args(args)
    removed = remove_leftovers()
    if removed:
        log.info("removed %d scratch folder(s) left by a server that did not stop cleanly", removed)
    _exit_on_sigterm()
    _private_gradio_dir()
    demo = build_app(args.models, settings)
    log.info("serving on http://%s:%d (concurrency %d)", args.host, args.port, settings.concurrency)
    launch(demo, args.host, int(args.port), settings, block=True)
