"""What each request of the image tabs does: the public API endpoints (`classify`, `classify_batch`, `model_card`)
and the page's private events, each one counted and audited by `app.ops` and answered from `app.service`.

Every refusal is a `gr.Error` whose message names the user's own file; it goes to the user only, never to the log.
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from PIL import Image

from app.ops import Ops, referral_counts, with_request
from app.readout import readout_markdown
from app.service import LesionService
from app.wording import batch_note, card_markdown
from pipelines.images import ImageError

__all__ = ["API_BATCH", "API_CARD", "API_SINGLE", "API_WEBCAM", "ImageHandlers", "file_path"]

log = logging.getLogger(__name__)

API_SINGLE = "classify"
API_WEBCAM = "classify_webcam"
API_BATCH = "classify_batch"
API_CARD = "model_card"


def file_path(value: Any) -> str | None:
    """The server-side path of a gr.File / gr.Image value (a str, a NamedString or a dict with 'path')."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("path")
    return str(value)


def _refusal(err: Exception) -> gr.Error:
    """The error shown for a file that cannot be analysed (logged by its kind only)."""
    log.info("rejected an upload (%s)", type(err).__name__)
    return gr.Error(str(err), duration=None, title="This file cannot be analysed", print_exception=False)


class ImageHandlers:
    """The image tabs' request handlers over one `LesionService`, each observed by `ops` (metrics, audit log).

    Gradio groups concurrency by function object: bind each method once (`handlers.classify`) and reuse it for
    every event that should share its queue.
    """

    def __init__(self, service: LesionService, ops: Ops) -> None:
        self.service = service
        self.ops = ops

    def _single_outputs(self, result: dict[str, Any]) -> tuple:
        """The single-image outputs of `LesionService.analyse`'s result, images written as our own files."""
        # Gradio writes PIL outputs to a content-addressed cache path non-atomically, which breaks identical answers
        # served at the same time: hand it our own files instead.
        save = self.service.save_output
        return (result["referral"], result["probabilities"], save(result["heatmap"], "heatmap"),
                result["heat_note"], save(result["outline"], "outline"), readout_markdown(result["details"]["abcd"]),
                result["details"])

    @with_request
    def classify(self, image_file: Any, model_name: str | None, request: Any = None) -> tuple:
        """Classify one uploaded image: probabilities, malignancy vs threshold, heat-map, ABCD readout, details."""
        path = file_path(image_file)
        if not path:
            raise gr.Error("no image was received; upload a JPEG, PNG, TIFF, BMP, WebP or DICOM file",
                           print_exception=False)
        service = self.service
        with self.ops.observe(API_SINGLE, model_name, request) as call:
            held = service.janitor.hold([path])
            try:
                model = service.model(model_name)
                call.model = model.name
                image = service.decode(path, model)
                result = service.analyse(image, model)
            except (ImageError, ValueError) as err:
                call.fail(err)
                raise _refusal(err) from None
            finally:
                service.janitor.release(held)
            call.referral = result["details"]["referral"]
            return (*self._single_outputs(result), image)

    @with_request
    def reanalyse(self, image: Image.Image | None, model_name: str | None, request: Any = None) -> tuple:
        """Re-run the last uploaded image (kept in this session's memory) with another model."""
        if image is None:
            return ("", "", None, "", None, "", None)
        with self.ops.observe("reanalyse", model_name, request) as call:
            try:
                model = self.service.model(model_name)
                call.model = model.name
                result = self.service.analyse(image, model)
            except ValueError as err:
                call.fail(err)
                raise _refusal(err) from None
            call.referral = result["details"]["referral"]
            return self._single_outputs(result)

    @with_request
    def classify_batch(self, files: list[Any] | None, model_name: str | None, request: Any = None) -> tuple:
        """Classify several images: the `lesionlab predict` table, its CSV and the files that were skipped."""
        paths = [p for p in (file_path(f) for f in (files or [])) if p]
        if not paths:
            raise gr.Error("no files were received; select one or more images", print_exception=False)
        service = self.service
        with self.ops.observe(API_BATCH, model_name, request) as call:
            call.n_images = len(paths)
            held = service.janitor.hold(paths)
            try:
                model = service.model(model_name)
                call.model = model.name
                table, csv, skipped = service.batch(paths, model)
            except (ImageError, ValueError) as err:
                call.fail(err)
                raise _refusal(err) from None
            finally:
                # Kept while the page may press "Classify all" again (e.g. with another model), then deleted.
                service.janitor.release(held, grace_s=service.settings.output_max_age_s)
            call.referral, call.n_skipped = referral_counts(table["referral"]), len(skipped)
        return table, str(csv), batch_note(len(table), len(paths), skipped)

    @with_request
    def model_card(self, model_name: str | None, request: Any = None) -> str:
        """The model card summary of one served model."""
        with self.ops.observe(API_CARD, model_name, request, audit=False) as call:
            call.n_images = 0
            try:
                model = self.service.model(model_name)
            except ValueError as err:
                call.fail(err)
                raise gr.Error(str(err), print_exception=False) from None
            call.model = model.name
            return card_markdown(model.name, model.card)

    @staticmethod
    def clear_single() -> tuple:
        """Empty the single-image outputs and forget the session's image (a new upload, or the upload cleared)."""
        return ("", "", None, "", None, "", None, None)
