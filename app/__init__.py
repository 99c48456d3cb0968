"""The clinician web app (Gradio) and the code it calls.

| module | what lives there |
|---|---|
| `cli` | argparse wiring of `lesionlab serve` and `lesionlab users add` (`add_cli`) and the functions they run |
| `server` | `serve` (load the bundles, serve until stopped), `launch` (HTTP server, /healthz, /metrics, logins) |
| `layout` | the page: `build_app`, one small function per tab or panel |
| `handlers` | what each request of the image tabs does (API endpoints `classify`, `classify_batch`, `model_card`) |
| `service` | loading bundles, `LesionService` (analyse one image, a batch), `health` |
| `settings` | `ServeSettings`: what `lesionlab serve` can configure |
| `janitor` | `FileJanitor` (deletes uploads and outputs), private scratch folders and a killed server's leftovers |
| `pathology` | the pathology tab: one case (H&E image, slide or patches) through a MIL bundle |
| `wording` | every text the clinician reads, built from numbers and a bundle's card |
| `explain`, `readout` | the heat-map (Grad-CAM, attention rollout) and the ABCD readout of one image |
| `ops`, `auth` | metrics, audit log, header timeout; the login file |

Imports point one way, `cli -> server -> layout -> handlers, pathology -> service -> explain, readout, janitor,
settings, wording`, with no cycle (not even through a function-local import).
"""

from pipelines import apply_offline_defaults

__all__: list[str] = []

# The library's offline and private environment defaults (no analytics, no hub access, no telemetry), set before any
# app module imports gradio or huggingface_hub.
apply_offline_defaults()
