"""Faithful LoRA loading into a FLUX pipeline: kohya / BFL-format files (transformer, CLIP-L and T5 keys) and our
diffusers-format files, with a per-component report of what was applied.

A file of which any tensor would be dropped is refused, naming the first such keys: "it loaded" proves nothing
(diffusers once applied kohya FLUX keys as nothing, and its converter skips T5 keys), so every LoRA module of the
file is mapped to existing Linear layers with matching shapes before anything is loaded, and every injected layer
is compared with the file afterwards.

kohya keys are applied as peft LoRA adapters (not merged into the weights) on the transformer, the CLIP text encoder
(`text_encoder`) and the T5 encoder (`text_encoder_2`), with kohya's scale alpha / rank. The pipeline's
`_lora_loadable_modules` is extended with `text_encoder_2` when T5 layers are loaded, so the pipeline's own
`unload_lora_weights`, `set_adapters`, `delete_adapters`, `fuse_lora` and the `joint_attention_kwargs={"scale": s}`
LoRA scale act on all three components alike (kohya's multiplier also scales every module).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMPONENTS",
    "LoraLoadError",
    "LoraReport",
    "is_kohya_state_dict",
    "load_diffusers_lora",
    "load_kohya_lora",
    "load_lora_file",
]

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
COMPONENT_LABELS = {"transformer": "transformer", "text_encoder": "CLIP", "text_encoder_2": "T5"}
# kohya prefixes: lora_unet (FLUX transformer), lora_te / lora_te1 (CLIP-L), lora_te3 (T5-XXL; lora_te2 in early
# sd-scripts versions of lora_flux.py). Longest first, so that "lora_te1_" is not read as "lora_te_" + "1_".
KOHYA_PREFIXES = (
    ("lora_unet_", "transformer"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
)
# Other writers of BFL-named FLUX LoRAs (ComfyUI, ai-toolkit): module paths with dots, mapped to kohya names.
DOTTED_PREFIXES = (
    ("diffusion_model.", "lora_unet_"),
    ("text_encoders.clip_l.transformer.", "lora_te1_"),
    ("text_encoders.t5xxl.transformer.", "lora_te3_"),
)
KOHYA_SUFFIXES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "alpha": "alpha",
}
DIFFUSERS_SUFFIXES = ("lora_A.weight", "lora_B.weight", "alpha")

# BFL FLUX module (kohya name without "lora_unet_") -> diffusers FluxTransformer2DModel modules, in the order their
# outputs are concatenated in BFL's fused layer (attention qkv; single-block qkv + MLP input).
_DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_GLOBAL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in_in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in_out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer_linear": ("proj_out",),
    "final_layer_adaLN_modulation_1": ("norm_out.linear",),
}
# BFL's final modulation outputs (shift, scale); diffusers' AdaLayerNormContinuous splits (scale, shift).
_SWAP_HALVES = {"final_layer_adaLN_modulation_1"}


class LoraLoadError(ValueError):
    """A LoRA file that cannot be applied in full to this pipeline."""


@dataclass
class LoraReport:
    """What a LoRA file put into a pipeline, per component (transformer, CLIP text encoder, T5 encoder).

    `file_modules`: LoRA modules of the file; `tensors`: its tensors (down, up, alpha), all of which were applied;
    `layers`: peft LoRA layers carrying the adapter (one BFL fused qkv module becomes three diffusers layers).
    """

    path: str
    format: str  # "kohya" (kohya or other BFL-named files) or "diffusers"
    adapter_name: str
    file_modules: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "format": self.format, "adapter_name": self.adapter_name,
                "file_modules": dict(self.file_modules), "tensors": dict(self.tensors), "layers": dict(self.layers)}

    def summary(self) -> str:
        """One line: per component, file modules -> LoRA layers (tensors)."""
        parts = [f"{COMPONENT_LABELS[c]} {self.file_modules.get(c, 0)} modules -> {self.layers.get(c, 0)} layers "
                 f"({self.tensors.get(c, 0)} tensors)" for c in COMPONENTS]
        return f"LoRA '{Path(self.path).name}' ({self.format}, adapter '{self.adapter_name}'): " + ", ".join(parts)


@dataclass
class _Module:
    """One LoRA module of a file and the Linear layers of one component it updates."""

    name: str  # the file's module name (kohya form)
    component: str
    targets: tuple[str, ...] = ()
    down: Any = None
    up: Any = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale_alpha(self) -> float:
        # kohya: a missing or zero alpha means alpha = rank (scale 1)
        return float(self.rank) if not self.alpha else float(self.alpha)


def _refuse(path: Path, problem: str, keys: list[str], limit: int = 5) -> LoraLoadError:
    shown = ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")
    return LoraLoadError(f"LoRA '{path}' {problem}: {shown}; nothing was loaded")


def _linears(model: Any) -> dict[str, Any]:
    import torch

    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def _text_encoder_names(model: Any, component: str) -> dict[str, str]:
    """kohya module name (dots as underscores, no prefix) -> module path, over the encoder's Linear layers."""
    names: dict[str, str] = {}
    for path in _linears(model):
        names[path.replace(".", "_")] = path
        if component == "text_encoder" and not path.startswith("text_model."):
            # transformers >= 5 flattens CLIPTextModel; kohya names keep its former "text_model." level
            names["text_model_" + path.replace(".", "_")] = path
    return names


def _transformer_names(model: Any) -> dict[str, tuple[str, ...]]:
    """kohya module name (no prefix) -> diffusers module paths, for the modules this transformer has."""
    linears = _linears(model)
    names: dict[str, tuple[str, ...]] = {}
    for i in range(len(getattr(model, "transformer_blocks", []))):
        for bfl, targets in _DOUBLE_BLOCK.items():
            names[f"double_blocks_{i}_{bfl}"] = tuple(f"transformer_blocks.{i}.{t}" for t in targets)
    for i in range(len(getattr(model, "single_transformer_blocks", []))):
        for bfl, targets in _SINGLE_BLOCK.items():
            names[f"single_blocks_{i}_{bfl}"] = tuple(f"single_transformer_blocks.{i}.{t}" for t in targets)
    names.update(_GLOBAL)
    return {name: targets for name, targets in names.items() if all(t in linears for t in targets)}


def _kohya_name(key: str) -> tuple[str, str] | None:
    """(kohya module name, tensor role) of a file key, or None when the key is not a LoRA tensor we know."""
    for suffix, role in KOHYA_SUFFIXES.items():
        if key.endswith("." + suffix):
            module = key[: -len(suffix) - 1]
            for dotted, prefix in DOTTED_PREFIXES:
                if module.startswith(dotted):
                    module = prefix + module[len(dotted):].replace(".", "_")
            return (module, role) if "." not in module else None
    return None


def is_kohya_state_dict(state_dict: dict[str, Any]) -> bool:
    """True when the keys are kohya / BFL-named (lora_unet_, lora_te*_, diffusion_model., text_encoders.)."""
    starts = tuple(p for p, _ in KOHYA_PREFIXES) + tuple(p for p, _ in DOTTED_PREFIXES)
    return any(key.startswith(starts) for key in state_dict)


def _parse_kohya(path: Path, state_dict: dict[str, Any], pipe: Any) -> list[_Module]:
    """Map every tensor of a kohya / BFL-format file to the pipeline's layers; refuse what would be dropped."""
    lookup: dict[str, dict[str, Any]] = {}
    if getattr(pipe, "transformer", None) is not None:
        lookup["transformer"] = _transformer_names(pipe.transformer)
    for component in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            lookup[component] = _text_encoder_names(getattr(pipe, component), component)

    modules: dict[str, _Module] = {}
    unknown, unmatched = [], []
    for key in sorted(state_dict):
        parsed = _kohya_name(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, role = parsed
        prefix, component = next(((p, c) for p, c in KOHYA_PREFIXES if name.startswith(p)), ("", ""))
        found = lookup.get(component, {}).get(name[len(prefix):])
        if found is None:
            unmatched.append(key)
            continue
        module = modules.setdefault(name, _Module(name, component, found if isinstance(found, tuple) else (found,)))
        module.keys.append(key)
        tensor = state_dict[key]
        if role != "alpha":
            setattr(module, role, tensor)
        elif tensor.numel() == 1:
            module.alpha = float(tensor.float().reshape(-1)[0])
        else:
            unknown.append(key)
    if unknown:
        raise _refuse(path, "has tensors that are not LoRA down / up / alpha tensors (DoRA, LoKr, biases or "
                      "norms are not supported)", unknown)
    if unmatched:
        raise _refuse(path, "has keys whose target module does not exist in this pipeline", unmatched)
    _check_shapes(path, pipe, list(modules.values()))
    return list(modules.values())


def _check_shapes(path: Path, pipe: Any, modules: list[_Module]) -> None:
    """Refuse incomplete modules and shapes that do not fit the target layers (named with both shapes)."""
    incomplete = [m.keys[0] for m in modules if m.down is None or m.up is None]
    if incomplete:
        raise _refuse(path, "has LoRA modules without both a down and an up tensor", incomplete)
    targeted: dict[tuple[str, str], str] = {}
    linears = {c: _linears(getattr(pipe, c)) for c in {m.component for m in modules}}
    for module in modules:
        layers = [linears[module.component][t] for t in module.targets]
        in_features, out_features = layers[0].in_features, sum(layer.out_features for layer in layers)
        down, up = module.down, module.up
        if (down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != out_features
                or up.shape[1] != down.shape[0]):
            raise LoraLoadError(
                f"LoRA '{path}' module '{module.name}' has down {tuple(down.shape)} and up {tuple(up.shape)}; "
                f"its target {module.component}.{'+'.join(module.targets)} needs down (rank, {in_features}) and up "
                f"({out_features}, rank); nothing was loaded"
            )
        for target in module.targets:
            earlier = targeted.setdefault((module.component, target), module.name)
            if earlier != module.name:
                raise _refuse(path, f"has two modules for {module.component}.{target}", [earlier, module.name])


def _peft_state(modules: list[_Module], pipe: Any) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict]]:
    """Per component: the peft state dict, the LoraConfig arguments and the expected (A, B, scale) per layer."""
    out: dict[str, tuple[dict[str, Any], dict[str, Any], dict]] = {}
    for component in COMPONENTS:
        mine = [m for m in modules if m.component == component]
        if not mine:
            continue
        linears = _linears(getattr(pipe, component))
        state, expected, ranks, alphas = {}, {}, {}, {}
        for module in mine:
            sizes = [linears[t].out_features for t in module.targets]
            up = module.up
            if module.name.removeprefix("lora_unet_") in _SWAP_HALVES:
                half = up.shape[0] // 2
                up = up.roll(-half, dims=0)  # (shift, scale) rows -> (scale, shift)
            for target, rows in zip(module.targets, up.split(sizes, dim=0), strict=True):
                state[f"{target}.lora_A.weight"] = module.down
                state[f"{target}.lora_B.weight"] = rows.contiguous()
                ranks[target], alphas[target] = module.rank, module.scale_alpha
                expected[target] = (module.down, rows, module.scale_alpha / module.rank)
        rank = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            # a full-match regex: a plain list would also match e.g. every block's "proj_out" for the top "proj_out"
            "target_modules": "^(?:" + "|".join(re.escape(t) for t in sorted(ranks)) + ")$",
            "rank_pattern": {"^" + re.escape(t): r for t, r in ranks.items() if r != rank},
            "alpha_pattern": {"^" + re.escape(t): a for t, a in alphas.items() if a != alpha},
            "init_lora_weights": False,
        }
        out[component] = (state, config, expected)
    return out


def _lora_layers(model: Any, adapter_name: str) -> dict[str, Any]:
    """Module path -> peft LoRA layer holding `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


def _adapter_names(pipe: Any) -> set[str]:
    names: set[str] = set()
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None and getattr(model, "peft_config", None):
            names.update(model.peft_config)
    return names


def _register_t5(pipe: Any) -> None:
    """Let the pipeline's LoRA methods (unload, set_adapters, fuse, delete) reach the T5 encoder too."""
    loadable = list(getattr(pipe, "_lora_loadable_modules", []))
    if "text_encoder_2" not in loadable:
        pipe._lora_loadable_modules = [*loadable, "text_encoder_2"]


def _discard(pipe: Any, adapter_name: str) -> None:
    """Remove a partly loaded adapter from every component."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch
    from diffusers.utils.peft_utils import delete_adapter_layers

    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        config = (getattr(model, "peft_config", None) or {}) if model is not None else {}
        if model is None or (adapter_name not in config and not _lora_layers(model, adapter_name)):
            continue
        if set(config) - {adapter_name}:  # other adapters stay
            delete_adapter_layers(model, adapter_name)
            config.pop(adapter_name, None)
        elif component == "transformer":
            model.unload_lora()
        else:
            _remove_text_encoder_monkey_patch(model)


def _verify(path: Path, pipe: Any, adapter_name: str, expected: dict[str, dict]) -> dict[str, int]:
    """Compare every injected layer with the file; the number of layers per component, or raise."""
    import torch

    layers: dict[str, int] = {}
    for component, wanted in expected.items():
        found = _lora_layers(getattr(pipe, component), adapter_name)
        missing = sorted(set(wanted) - set(found))
        extra = sorted(set(found) - set(wanted))
        wrong = []
        for name in sorted(set(wanted) & set(found)):
            layer = found[name]
            a_ref, b_ref, scale = wanted[name]
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if (a.shape != a_ref.shape or b.shape != b_ref.shape
                    or not torch.equal(a.detach().cpu(), a_ref.to(a.dtype))
                    or not torch.equal(b.detach().cpu(), b_ref.to(b.dtype))
                    or abs(layer.scaling[adapter_name] - scale) > 1e-6 * max(1.0, abs(scale))):
                wrong.append(name)
        if missing or extra or wrong:
            _discard(pipe, adapter_name)
            problems = [f"{component}.{n} (not applied)" for n in missing]
            problems += [f"{component}.{n} (unexpected layer)" for n in extra]
            problems += [f"{component}.{n} (weights or scale differ from the file)" for n in wrong]
            raise _refuse(path, "was not applied as written", problems)
        layers[component] = len(found)
    return layers


def load_kohya_lora(pipe: Any, path: Path, state_dict: dict[str, Any], adapter_name: str) -> LoraReport:
    """Apply a kohya / BFL-format FLUX LoRA as peft adapters on the transformer, CLIP and T5; report or refuse."""
    from peft import LoraConfig

    modules = _parse_kohya(path, state_dict, pipe)
    per_component = _peft_state(modules, pipe)
    try:
        for component, (state, config, _) in per_component.items():
            model = getattr(pipe, component)
            if component == "transformer":
                model.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
            else:
                model.load_adapter(adapter_name=adapter_name, adapter_state_dict=state,
                                   peft_config=LoraConfig(**config))
                if component == "text_encoder_2":
                    _register_t5(pipe)
    except Exception:
        _discard(pipe, adapter_name)
        raise
    layers = _verify(path, pipe, adapter_name, {c: e for c, (_, _, e) in per_component.items()})
    report = LoraReport(str(path), "kohya", adapter_name)
    for component in COMPONENTS:
        mine = [m for m in modules if m.component == component]
        report.file_modules[component] = len(mine)
        report.tensors[component] = sum(len(m.keys) for m in mine)
        report.layers[component] = layers.get(component, 0)
    return report


def _diffusers_target(model: Any, module_path: str) -> str | None:
    """Path of the Linear layer a diffusers-format key names (CLIP keys may keep the `text_model.` level that
    transformers 5 removed), or None."""
    linears = _linears(model)
    if module_path in linears:
        return module_path
    if module_path.startswith("text_model.") and module_path.removeprefix("text_model.") in linears:
        return module_path.removeprefix("text_model.")
    return None


def load_diffusers_lora(pipe: Any, path: Path, state_dict: dict[str, Any], adapter_name: str) -> LoraReport:
    """Load a diffusers-format LoRA with `load_lora_weights` after checking every key has a target; report."""
    import torch

    expected: dict[str, dict[str, dict[str, Any]]] = {}
    unknown, unmatched = [], []
    for key in sorted(state_dict):
        component, _, rest = key.partition(".")
        suffix = next((s for s in DIFFUSERS_SUFFIXES if rest.endswith("." + s)), None)
        if component not in ("transformer", "text_encoder") or suffix is None:
            unknown.append(key)
            continue
        model = getattr(pipe, component, None)
        target = _diffusers_target(model, rest[: -len(suffix) - 1]) if model is not None else None
        if target is None:
            unmatched.append(key)
            continue
        expected.setdefault(component, {}).setdefault(target, {})[suffix] = state_dict[key]
    if unknown:
        raise _refuse(path, "has keys that are neither diffusers-format transformer. / text_encoder. LoRA tensors "
                      "nor kohya keys", unknown)
    if unmatched:
        raise _refuse(path, "has keys whose target module does not exist in this pipeline", unmatched)
    for component, targets in expected.items():
        linears = _linears(getattr(pipe, component))
        for target, tensors in targets.items():
            a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
            layer = linears[target]
            if a is None or b is None or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                shapes = f"A {tuple(a.shape) if a is not None else None}, B {tuple(b.shape) if b is not None else None}"
                raise LoraLoadError(
                    f"LoRA '{path}' module {component}.{target} has {shapes}; the layer needs A (rank, "
                    f"{layer.in_features}) and B ({layer.out_features}, rank); nothing was loaded"
                )

    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    except Exception:
        _discard(pipe, adapter_name)
        raise
    report = LoraReport(str(path), "diffusers", adapter_name)
    problems = []
    for component in COMPONENTS:
        targets = expected.get(component, {})
        model = getattr(pipe, component, None)
        found = _lora_layers(model, adapter_name) if model is not None else {}
        for target, tensors in targets.items():
            layer = found.get(target)
            if layer is None:
                problems.append(f"{component}.{target} (not applied)")
                continue
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if not (torch.equal(a.detach().cpu(), tensors["lora_A.weight"].to(a.dtype))
                    and torch.equal(b.detach().cpu(), tensors["lora_B.weight"].to(b.dtype))):
                problems.append(f"{component}.{target} (weights differ from the file)")
        report.file_modules[component] = len(targets)
        report.tensors[component] = sum(len(t) for t in targets.values())
        report.layers[component] = len(found)
        if len(found) != len(targets):
            problems += [f"{component}.{n} (unexpected layer)" for n in sorted(set(found) - set(targets))]
    if problems:
        _discard(pipe, adapter_name)
        raise _refuse(path, "was not applied as written", problems)
    return report


def load_lora_file(pipe: Any, path: str | Path, adapter_name: str) -> LoraReport:
    """Load a diffusers- or kohya-format LoRA `.safetensors` file into `pipe` as adapter `adapter_name`."""
    from safetensors.torch import load_file

    path = Path(path)
    if adapter_name in _adapter_names(pipe):
        raise LoraLoadError(f"adapter '{adapter_name}' is already loaded; unload it or choose another adapter name")
    state_dict = load_file(str(path))
    if not state_dict:
        raise LoraLoadError(f"LoRA '{path}' holds no tensors")
    if is_kohya_state_dict(state_dict):
        report = load_kohya_lora(pipe, path, state_dict, adapter_name)
    else:
        report = load_diffusers_lora(pipe, path, state_dict, adapter_name)
    log.info("%s", report.summary())
    return report
