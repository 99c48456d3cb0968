"""The page of the clinician web app (Gradio Blocks): the single-image tab with its explanation, the batch tab with
its table and CSV, and the pathology tab when a MIL bundle is served; one small function per tab or panel.

`build_app` loads the bundles and returns the Blocks; `app.server.launch` serves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from app.handlers import API_BATCH, API_CARD, API_SINGLE, API_WEBCAM, ImageHandlers
from app.janitor import FileJanitor
from app.ops import Ops
from app.pathology import build_pathology_tab
from app.service import LesionService, ServedModel, load_models
from app.settings import ServeSettings
from app.wording import INTENDED_USE, card_markdown, file_types_note, privacy_note
from models.bundle import Bundle

__all__ = ["APP_CSS", "build_app"]

# Tables keep whole words (the ABCD readout on a 390 px phone) and scroll sideways instead.
APP_CSS = """
#abcd table, #probabilities table { display: block; overflow-x: auto; }
#abcd td, #abcd th, #probabilities td, #probabilities th { word-break: normal; overflow-wrap: normal; hyphens: none; }
"""


def build_app(
    bundles_dir: str | Path,
    settings: ServeSettings | None = None,
    models: dict[str, ServedModel] | None = None,
    mil_bundles: dict[str, Bundle] | None = None,
) -> gr.Blocks:
    """The Gradio Blocks app over every bundle in `bundles_dir` (loaded once, unless `models` are passed in).

    The Blocks carries what `app.server.launch` needs: `lesionlab_service` (the loaded models and the janitor, also
    for tests and benchmarks), `lesionlab_ops` (metrics and audit log, served at /metrics) and `lesionlab_css`.
    """
    settings = settings or ServeSettings()
    if models is None:
        models, mil_bundles = load_models(bundles_dir, settings)
    mil_bundles = mil_bundles or {}
    if not models and not mil_bundles:
        raise FileNotFoundError(f"'{bundles_dir}' holds no usable model bundle")
    janitor = FileJanitor(get_upload_folder(), settings.upload_grace_s)
    service = LesionService(models, settings, janitor, mil_bundles)
    ops = Ops(service.model_versions(), settings.audit_log)
    with gr.Blocks(title="lesionlab", analytics_enabled=False,
                   delete_cache=(60, max(60, settings.output_max_age_s))) as demo:
        gr.Markdown("# lesionlab: skin lesion classifier with explanations")
        gr.Markdown(INTENDED_USE, elem_id="intended-use")
        with gr.Tabs():
            if models:
                handlers = ImageHandlers(service, ops)
                _single_image_tab(service, handlers)
                _batch_tab(service, handlers)
            if mil_bundles:
                # the image tabs' file limits, and the app's janitor (uploads deleted after each request)
                build_pathology_tab(mil_bundles, janitor=janitor, limits=settings.limits(), ops=ops)
        gr.Markdown(privacy_note(settings.output_max_age_s))
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    demo.lesionlab_service = service
    demo.lesionlab_ops = ops
    demo.lesionlab_css = APP_CSS
    return demo


def _default_model(service: LesionService) -> str:
    """The model a page opens with: the shipped `default_bundle` when served, else the first one."""
    return "default_bundle" if "default_bundle" in service.models else next(iter(service.models))


def _file_note(settings: ServeSettings) -> str:
    return file_types_note(settings.max_file_mb, settings.max_megapixels)


def _image_inputs(service: LesionService) -> tuple[Any, Any, Any]:
    """The left column of the single-image tab: (model dropdown, file upload, webcam)."""
    with gr.Column(scale=1):
        model_box = gr.Dropdown(list(service.models), value=_default_model(service), label="Model", elem_id="model")
        with gr.Tabs():
            with gr.Tab("Upload a file"):
                upload = gr.File(label=f"Dermoscopy image ({_file_note(service.settings)}); drag and drop or click "
                                 "to choose", type="filepath", elem_id="upload")
            with gr.Tab("Webcam"):
                webcam = gr.Image(sources=["webcam"], type="filepath", image_mode=None, label="Take a photo",
                                  elem_id="webcam")
    return model_box, upload, webcam


def _image_results() -> list[Any]:
    """The right column of the single-image tab, in the order of `ImageHandlers.classify`'s outputs."""
    with gr.Column(scale=2):
        referral = gr.HTML(label="Referral", elem_id="referral")
        probabilities = gr.Markdown(label="Diagnosis probabilities", elem_id="probabilities")
        with gr.Row():
            heatmap = gr.Image(label="Explanation heat-map", type="filepath", format="png", interactive=False,
                               height=354, elem_id="heatmap")
            outline = gr.Image(label="Lesion outline used for the ABCD readout", type="filepath", format="png",
                               interactive=False, height=354, elem_id="outline")
        heat_note = gr.Markdown(elem_id="heat-note")
        readout = gr.Markdown(label="ABCD readout", elem_id="abcd")
        with gr.Accordion("Details (JSON)", open=False):
            details = gr.JSON(label="details", elem_id="details")
    return [referral, probabilities, heatmap, heat_note, outline, readout, details]


def _single_image_tab(service: LesionService, handlers: ImageHandlers) -> None:
    """One image (upload or webcam) -> referral, probabilities, heat-map, ABCD readout; switching the model
    re-runs the last image."""
    default = _default_model(service)
    with gr.Tab("Single image", id="single"):
        with gr.Row():
            model_box, upload, webcam = _image_inputs(service)
            outputs = _image_results()
        # Below the result on every screen: on a phone the columns stack and the result comes first.
        card_box = gr.Markdown(card_markdown(default, service.models[default].card), label="model card",
                               elem_id="card")
        image_state = gr.State(None, time_to_live=service.settings.session_ttl_s)
        classify, clear = handlers.classify, handlers.clear_single  # one function each: one concurrency group
        for source, event, api_name in ((upload, upload.upload, API_SINGLE), (webcam, webcam.input, API_WEBCAM)):
            event(clear, None, [*outputs, image_state], queue=False, api_visibility="private").then(
                classify, [source, model_box], [*outputs, image_state], api_name=api_name,
                api_visibility="public" if source is upload else "private",
            )
        upload.clear(clear, None, [*outputs, image_state], queue=False, api_visibility="private")
        model_box.change(handlers.model_card, [model_box], [card_box], api_name=API_CARD).then(
            handlers.reanalyse, [image_state, model_box], outputs, api_visibility="private"
        )


def _batch_tab(service: LesionService, handlers: ImageHandlers) -> None:
    """Several images -> the `lesionlab predict` table on screen, its CSV to download, and the skipped files."""
    with gr.Tab("Batch", id="batch"):
        with gr.Row():
            model_box = gr.Dropdown(list(service.models), value=_default_model(service), label="Model",
                                    elem_id="batch-model")
            files = gr.File(label=f"Images ({_file_note(service.settings)} each)", file_count="multiple",
                            type="filepath", elem_id="batch-files")
        button = gr.Button("Classify all", variant="primary", elem_id="batch-run")
        note = gr.Markdown(label="skipped files", elem_id="batch-note")
        table = gr.Dataframe(label="Predictions", interactive=False, elem_id="batch-table")
        csv = gr.File(label="Download CSV (same columns as `lesionlab predict`)", elem_id="batch-csv")
        button.click(handlers.classify_batch, [files, model_box], [table, csv, note], api_name=API_BATCH)
