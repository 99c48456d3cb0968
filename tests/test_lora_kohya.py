"""kohya-format FLUX LoRAs (transformer, CLIP-L and T5 keys) load into the tiny pipeline exactly as a hand merge of
the same low-rank updates, are counted per component, and a file with any tensor that would be dropped is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import synthesis as S
from pipelines.synthesis import LoraLoadError

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

RANK, ALPHA = 4, 2.0  # kohya's scale alpha / rank = 0.5
T5_RANK, T5_ALPHA = 2, 8.0  # another rank and scale (4.0) for T5, as kohya's network_reg_dims can write
WO_RANK, WO_ALPHA = 3, 1.0  # and a third for T5's `wo` layers, so ranks and alphas differ within one component

# The tiny pipeline seen as BFL's FLUX (hidden 32, MLP 128, in_channels 4, CLIP/T5 width 32, feed-forward 37):
# kohya module name -> (out, in) of the BFL Linear it targets.
BFL_DOUBLE = {
    "img_attn_qkv": (96, 32), "img_attn_proj": (32, 32), "img_mlp_0": (128, 32), "img_mlp_2": (32, 128),
    "img_mod_lin": (192, 32), "txt_attn_qkv": (96, 32), "txt_attn_proj": (32, 32), "txt_mlp_0": (128, 32),
    "txt_mlp_2": (32, 128), "txt_mod_lin": (192, 32),
}
BFL_SINGLE = {"linear1": (224, 32), "linear2": (32, 160), "modulation_lin": (96, 32)}
BFL_IN = {  # kohya's `in_dims` modules
    "img_in": (32, 4), "txt_in": (32, 32), "time_in_in_layer": (32, 256), "time_in_out_layer": (32, 32),
    "vector_in_in_layer": (32, 32), "vector_in_out_layer": (32, 32), "guidance_in_in_layer": (32, 256),
    "guidance_in_out_layer": (32, 32),
}
BFL_FINAL = {"final_layer_adaLN_modulation_1": (64, 32)}  # written by ComfyUI / ai-toolkit, not by kohya
# Text encoders: kohya name after the layer index -> (module path inside the layer, (out, in)).
CLIP = {
    "self_attn_q_proj": ("self_attn.q_proj", (32, 32)), "self_attn_k_proj": ("self_attn.k_proj", (32, 32)),
    "self_attn_v_proj": ("self_attn.v_proj", (32, 32)), "self_attn_out_proj": ("self_attn.out_proj", (32, 32)),
    "mlp_fc1": ("mlp.fc1", (37, 32)), "mlp_fc2": ("mlp.fc2", (32, 37)),
}
T5 = {  # the tiny T5 has ReLU feed-forward (wi, wo); T5-XXL v1.1 has wi_0, wi_1, wo
    "layer_0_SelfAttention_q": ("layer.0.SelfAttention.q", (32, 32)),
    "layer_0_SelfAttention_k": ("layer.0.SelfAttention.k", (32, 32)),
    "layer_0_SelfAttention_v": ("layer.0.SelfAttention.v", (32, 32)),
    "layer_0_SelfAttention_o": ("layer.0.SelfAttention.o", (32, 32)),
    "layer_1_DenseReluDense_wi": ("layer.1.DenseReluDense.wi", (37, 32)),
    "layer_1_DenseReluDense_wo": ("layer.1.DenseReluDense.wo", (32, 37)),
}

# Where each BFL module's output rows live in diffusers' FluxTransformer2DModel, in BFL's row order; the fused qkv
# and the single block's linear1 (q, k, v, MLP input) are split row-wise. The final modulation is (shift, scale) in
# BFL and (scale, shift) in diffusers.
DIFFUSERS_ROWS = {
    "double_blocks_0_img_attn_qkv": [("transformer_blocks.0.attn.to_q", 32), ("transformer_blocks.0.attn.to_k", 32),
                                     ("transformer_blocks.0.attn.to_v", 32)],
    "double_blocks_0_img_attn_proj": [("transformer_blocks.0.attn.to_out.0", 32)],
    "double_blocks_0_img_mlp_0": [("transformer_blocks.0.ff.net.0.proj", 128)],
    "double_blocks_0_img_mlp_2": [("transformer_blocks.0.ff.net.2", 32)],
    "double_blocks_0_img_mod_lin": [("transformer_blocks.0.norm1.linear", 192)],
    "double_blocks_0_txt_attn_qkv": [("transformer_blocks.0.attn.add_q_proj", 32),
                                     ("transformer_blocks.0.attn.add_k_proj", 32),
                                     ("transformer_blocks.0.attn.add_v_proj", 32)],
    "double_blocks_0_txt_attn_proj": [("transformer_blocks.0.attn.to_add_out", 32)],
    "double_blocks_0_txt_mlp_0": [("transformer_blocks.0.ff_context.net.0.proj", 128)],
    "double_blocks_0_txt_mlp_2": [("transformer_blocks.0.ff_context.net.2", 32)],
    "double_blocks_0_txt_mod_lin": [("transformer_blocks.0.norm1_context.linear", 192)],
    "single_blocks_0_linear1": [("single_transformer_blocks.0.attn.to_q", 32),
                                ("single_transformer_blocks.0.attn.to_k", 32),
                                ("single_transformer_blocks.0.attn.to_v", 32),
                                ("single_transformer_blocks.0.proj_mlp", 128)],
    "single_blocks_0_linear2": [("single_transformer_blocks.0.proj_out", 32)],
    "single_blocks_0_modulation_lin": [("single_transformer_blocks.0.norm.linear", 96)],
    "img_in": [("x_embedder", 32)],
    "txt_in": [("context_embedder", 32)],
    "time_in_in_layer": [("time_text_embed.timestep_embedder.linear_1", 32)],
    "time_in_out_layer": [("time_text_embed.timestep_embedder.linear_2", 32)],
    "vector_in_in_layer": [("time_text_embed.text_embedder.linear_1", 32)],
    "vector_in_out_layer": [("time_text_embed.text_embedder.linear_2", 32)],
    "guidance_in_in_layer": [("time_text_embed.guidance_embedder.linear_1", 32)],
    "guidance_in_out_layer": [("time_text_embed.guidance_embedder.linear_2", 32)],
    "final_layer_adaLN_modulation_1": [("norm_out.linear", 64)],
}


@pytest.fixture(scope="module")
def base_pipe():
    from pipelines.synthesis.tiny_flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built, not loaded with from_pretrained: T5 would otherwise apply dropout
    return pipe


def fresh(base_pipe):
    """A pipeline with its own copies of the three LoRA-bearing components (shared VAE, tokenizers, scheduler)."""
    from diffusers import FluxPipeline

    parts = {name: copy.deepcopy(base_pipe.components[name])
             for name in ("transformer", "text_encoder", "text_encoder_2")}
    pipe = FluxPipeline(**{**base_pipe.components, **parts})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _module(state: dict, name: str, out_in: tuple[int, int], rank: int, alpha: float, gen: torch.Generator) -> None:
    """kohya's three tensors for one module: lora_down (rank, in), lora_up (out, rank), 0-d alpha."""
    out_features, in_features = out_in
    state[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.2
    state[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.2
    state[f"{name}.alpha"] = torch.tensor(alpha)


def kohya_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA for the tiny pipeline: every block module, `in_dims` modules, CLIP-L and T5 layers."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in BFL_DOUBLE.items():
        _module(state, f"lora_unet_double_blocks_0_{name}", shape, RANK, ALPHA, gen)
    for name, shape in BFL_SINGLE.items():
        _module(state, f"lora_unet_single_blocks_0_{name}", shape, RANK, ALPHA, gen)
    for name, shape in {**BFL_IN, **BFL_FINAL}.items():
        _module(state, f"lora_unet_{name}", shape, RANK, ALPHA, gen)
    for layer in range(2):
        for name, (_, shape) in CLIP.items():
            _module(state, f"lora_te1_text_model_encoder_layers_{layer}_{name}", shape, RANK, ALPHA, gen)
        for name, (_, shape) in T5.items():
            rank, alpha = (WO_RANK, WO_ALPHA) if name.endswith("_wo") else (T5_RANK, T5_ALPHA)
            _module(state, f"lora_te3_encoder_block_{layer}_{name}", shape, rank, alpha, gen)
    return state


def text_encoder_paths() -> dict[str, tuple[str, str]]:
    """kohya module name -> (component, module path) for the tiny CLIP (below its `text_model`) and T5."""
    paths = {}
    for layer in range(2):
        for name, (path, _) in CLIP.items():
            paths[f"lora_te1_text_model_encoder_layers_{layer}_{name}"] = (
                "text_encoder", f"encoder.layers.{layer}.{path}")
        for name, (path, _) in T5.items():
            paths[f"lora_te3_encoder_block_{layer}_{name}"] = ("text_encoder_2", f"encoder.block.{layer}.{path}")
    return paths


def write(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK),
                                          "ss_network_alpha": str(ALPHA)})
    return path


def hand_merged(base_pipe, state: dict[str, torch.Tensor]):
    """A copy of the pipeline with W += alpha / rank * up @ down applied to the weights by hand."""
    pipe = fresh(base_pipe)
    modules = {key.rsplit(".", 2)[0] for key in state if key.endswith(".lora_down.weight")}
    with torch.no_grad():
        for name in modules:
            down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
            delta = float(state[f"{name}.alpha"]) / down.shape[0] * (up @ down)
            if name.startswith("lora_unet_"):
                bfl = name.removeprefix("lora_unet_")
                if bfl == "final_layer_adaLN_modulation_1":
                    shift, scale = delta.chunk(2, dim=0)
                    delta = torch.cat([scale, shift])
                row = 0
                for target, rows in DIFFUSERS_ROWS[bfl]:
                    pipe.transformer.get_submodule(target).weight += delta[row: row + rows]
                    row += rows
                assert row == delta.shape[0]
            else:
                component, path = text_encoder_paths()[name]
                model = getattr(pipe, component)
                model = getattr(model, "text_model", model)  # CLIPTextModel before transformers 5 had this level
                model.get_submodule(path).weight += delta
    return pipe


def effective_weights(model, adapter: str = "dermaflux") -> dict[str, torch.Tensor]:
    """Weight of every Linear layer as the model computes it (base + peft's scaled B @ A where a LoRA sits)."""
    from peft.tuners.lora import LoraLayer

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weights[name] = module.get_base_layer().weight + module.get_delta_weight(adapter)
        elif isinstance(module, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            weights[name] = module.weight
    return {name: weight.detach() for name, weight in weights.items()}


def component_outputs(pipe) -> dict[str, torch.Tensor]:
    """Forward of each text encoder and of the transformer on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 60, (1, 10), generator=gen)
    with torch.no_grad():
        clip = pipe.text_encoder(ids)
        t5 = pipe.text_encoder_2(ids).last_hidden_state
        sample = pipe.transformer(
            hidden_states=torch.randn(1, 16, 4, generator=gen),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.6]),
            img_ids=torch.randn(16, 3, generator=gen),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample
    return {"clip": clip.last_hidden_state, "clip_pooled": clip.pooler_output, "t5": t5, "transformer": sample}


def generate(pipe, **kwargs) -> torch.Tensor:
    return pipe(
        "This photo depicts a malignant lesion. The diagnosis is melanoma.",
        height=32, width=32, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=48,
        generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs,
    ).images


def lora_layer_count(pipe) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for c in ("transformer", "text_encoder", "text_encoder_2")
               for m in getattr(pipe, c).modules())


def test_kohya_file_changes_every_component_exactly_like_a_hand_merge(base_pipe, tmp_path: Path) -> None:
    state = kohya_state()
    pipe = fresh(base_pipe)
    S.load_lora(pipe, write(state, tmp_path / "dermaflux_kohya.safetensors"))
    merged = hand_merged(base_pipe, state)

    for component in ("transformer", "text_encoder", "text_encoder_2"):
        loaded_w = effective_weights(getattr(pipe, component))
        merged_w = effective_weights(getattr(merged, component))
        base_w = effective_weights(getattr(base_pipe, component))
        assert loaded_w.keys() == merged_w.keys()
        changed = [n for n in merged_w if not torch.equal(merged_w[n], base_w[n])]
        assert changed, component
        for name in merged_w:
            torch.testing.assert_close(loaded_w[name], merged_w[name], rtol=0, atol=1e-6, msg=f"{component}.{name}")

    loaded_out, merged_out, base_out = component_outputs(pipe), component_outputs(merged), component_outputs(base_pipe)
    for name in loaded_out:
        assert (merged_out[name] - base_out[name]).abs().max() > 1e-3, name  # the update matters for this output
        torch.testing.assert_close(loaded_out[name], merged_out[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(generate(pipe), generate(merged), rtol=1e-5, atol=1e-5)


def test_report_counts_modules_tensors_and_layers_per_component(base_pipe, tmp_path: Path) -> None:
    state = kohya_state()
    report = S.load_lora(fresh(base_pipe), write(state, tmp_path / "lora.safetensors"))
    transformer_modules = len(BFL_DOUBLE) + len(BFL_SINGLE) + len(BFL_IN) + len(BFL_FINAL)
    assert report.format == "kohya" and report.adapter_name == "dermaflux"
    assert report.file_modules == {"transformer": transformer_modules, "text_encoder": 12, "text_encoder_2": 12}
    assert report.tensors == {c: 3 * n for c, n in report.file_modules.items()}
    assert sum(report.tensors.values()) == len(state)  # every tensor of the file was applied
    # img qkv, txt qkv -> 3 layers each; single linear1 -> q, k, v and the MLP input
    assert report.layers == {"transformer": transformer_modules + 2 + 2 + 3, "text_encoder": 12, "text_encoder_2": 12}
    assert "T5 12 modules -> 12 layers (36 tensors)" in report.summary()


def test_clip_only_file_with_lora_te_prefix_loads_into_clip(base_pipe, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    state: dict[str, torch.Tensor] = {}
    for name, (_, shape) in CLIP.items():
        _module(state, f"lora_te_text_model_encoder_layers_1_{name}", shape, RANK, ALPHA, gen)
    pipe = fresh(base_pipe)
    report = S.load_lora(pipe, write(state, tmp_path / "clip.safetensors"))
    assert report.layers == {"transformer": 0, "text_encoder": 6, "text_encoder_2": 0}
    torch.testing.assert_close(component_outputs(pipe)["clip"], component_outputs(hand_merged(base_pipe, {
        k.replace("lora_te_", "lora_te1_"): v for k, v in state.items()}))["clip"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad_key", [
    "lora_unet_double_blocks_5_img_attn_qkv",  # the tiny transformer has one double block
    "lora_te3_encoder_block_0_layer_0_SelfAttention_qq",  # no such T5 layer
    "lora_te1_text_model_encoder_layers_7_mlp_fc1",  # CLIP has two layers
])
def test_file_with_one_unmatched_key_is_refused_naming_it(base_pipe, tmp_path: Path, bad_key: str) -> None:
    state = kohya_state()
    _module(state, bad_key, (32, 32), RANK, ALPHA, torch.Generator().manual_seed(9))
    pipe = fresh(base_pipe)
    with pytest.raises(LoraLoadError, match=f"target module does not exist.*{bad_key}.alpha") as refused:
        S.load_lora(pipe, write(state, tmp_path / "bad.safetensors"))
    assert "nothing was loaded" in str(refused.value)
    assert lora_layer_count(pipe) == 0 and not pipe.get_list_adapters()


def test_shape_mismatch_and_unsupported_tensors_are_refused(base_pipe, tmp_path: Path) -> None:
    state = kohya_state()
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(32, RANK)  # fc1 has 37 outputs
    pipe = fresh(base_pipe)
    with pytest.raises(LoraLoadError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1' has down \(4, 32\) and "
                                            r"up \(32, 4\).*\(37, rank\)"):
        S.load_lora(pipe, write(state, tmp_path / "shape.safetensors"))
    state = kohya_state()
    state["lora_unet_single_blocks_0_linear2.dora_scale"] = torch.ones(1, 160)
    with pytest.raises(LoraLoadError, match="not LoRA down / up / alpha.*lora_unet_single_blocks_0_linear2.dora_scale"):
        S.load_lora(pipe, write(state, tmp_path / "dora.safetensors"))
    assert lora_layer_count(pipe) == 0


def test_pipeline_lora_controls_reach_clip_and_t5(base_pipe, tmp_path: Path) -> None:
    """set_adapters, the generation-time LoRA scale, fuse_lora and unload_lora_weights act on all three components."""
    pipe = fresh(base_pipe)
    S.load_lora(pipe, write(kohya_state(), tmp_path / "lora.safetensors"))
    base_out, base_image = component_outputs(base_pipe), generate(base_pipe)
    assert (generate(pipe) - base_image).abs().max() > 1e-3
    torch.testing.assert_close(generate(pipe, joint_attention_kwargs={"scale": 0.0}), base_image, rtol=0, atol=1e-6)

    pipe.set_adapters("dermaflux", 0.0)
    for name, value in component_outputs(pipe).items():
        torch.testing.assert_close(value, base_out[name], rtol=0, atol=1e-6, msg=name)
    pipe.set_adapters("dermaflux", 1.0)
    assert (component_outputs(pipe)["t5"] - base_out["t5"]).abs().max() > 1e-3

    pipe.unload_lora_weights()
    assert lora_layer_count(pipe) == 0
    for name, value in component_outputs(pipe).items():
        torch.testing.assert_close(value, base_out[name], rtol=0, atol=0, msg=name)

    path = write(kohya_state(), tmp_path / "again.safetensors")
    S.load_lora(pipe, path)  # loads again once unloaded, but not twice under one name
    with pytest.raises(LoraLoadError, match="adapter 'dermaflux' is already loaded"):
        S.load_lora(pipe, path)
    with_lora = component_outputs(pipe)["t5"]
    pipe.fuse_lora(components=["text_encoder_2"])  # merged into T5's weights: same output
    query = "encoder.block.0.layer.0.SelfAttention.q"
    fused = pipe.text_encoder_2.get_submodule(query).get_base_layer().weight
    assert not torch.equal(fused, base_pipe.text_encoder_2.get_submodule(query).weight)
    torch.testing.assert_close(component_outputs(pipe)["t5"], with_lora, rtol=1e-5, atol=1e-5)


def test_bfl_dotted_keys_load_like_kohya_keys(base_pipe, tmp_path: Path) -> None:
    """ComfyUI / ai-toolkit write BFL module paths with dots (`diffusion_model.`, `text_encoders.t5xxl.`)."""
    gen = torch.Generator().manual_seed(4)
    kohya: dict[str, torch.Tensor] = {}
    _module(kohya, "lora_unet_double_blocks_0_img_attn_qkv", (96, 32), RANK, ALPHA, gen)
    _module(kohya, "lora_te3_encoder_block_1_layer_0_SelfAttention_q", (32, 32), RANK, ALPHA, gen)
    renamed = {"lora_unet_double_blocks_0_img_attn_qkv": "diffusion_model.double_blocks.0.img_attn.qkv",
               "lora_te3_encoder_block_1_layer_0_SelfAttention_q":
                   "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.q"}
    dotted = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        dotted[f"{renamed[module]}.{suffix.replace('lora_down', 'lora_A').replace('lora_up', 'lora_B')}"] = value
    one, two = fresh(base_pipe), fresh(base_pipe)
    S.load_lora(one, write(kohya, tmp_path / "kohya.safetensors"))
    report = S.load_lora(two, write(dotted, tmp_path / "dotted.safetensors"))
    assert report.layers == {"transformer": 3, "text_encoder": 0, "text_encoder_2": 1}
    for component in ("transformer", "text_encoder_2"):
        first, second = effective_weights(getattr(one, component)), effective_weights(getattr(two, component))
        assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_file_applied_as_nothing_is_refused_and_removed(base_pipe, tmp_path: Path, monkeypatch) -> None:
    """If the loader underneath silently applies nothing (as diffusers once did with kohya FLUX keys), the count
    after loading catches it, and what the other components received is removed again."""
    pipe = fresh(base_pipe)
    monkeypatch.setattr(pipe.transformer, "load_lora_adapter", lambda *args, **kwargs: None)
    with pytest.raises(LoraLoadError, match=r"was not applied as written: transformer\.context_embedder \(not "
                                            r"applied\).*\(and 24 more\); nothing was loaded"):
        S.load_lora(pipe, write(kohya_state(), tmp_path / "lora.safetensors"))
    assert lora_layer_count(pipe) == 0 and not pipe.get_list_adapters()


# diffusers' own loader warns that the top-level "proj_out" target also names the single block's proj_out; the
# report's layer count checks that it was not injected there.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
def test_diffusers_format_file_is_counted_and_an_unmatched_key_refused(base_pipe, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(5)
    layers = {
        "transformer_blocks.0.attn.to_q": (32, 32), "single_transformer_blocks.0.proj_mlp": (128, 32),
        "proj_out": (4, 32),
    }
    state = {}
    for name, (out_features, in_features) in layers.items():
        state[f"{name}.lora_A.weight"] = torch.randn(RANK, in_features, generator=gen)
        state[f"{name}.lora_B.weight"] = torch.randn(out_features, RANK, generator=gen)
    FluxPipeline.save_lora_weights(tmp_path / "ours", transformer_lora_layers=state)
    pipe = fresh(base_pipe)
    report = S.load_lora(pipe, tmp_path / "ours")
    assert report.format == "diffusers"
    assert report.layers == report.file_modules == {"transformer": 3, "text_encoder": 0, "text_encoder_2": 0}
    assert (component_outputs(pipe)["transformer"] - component_outputs(base_pipe)["transformer"]).abs().max() > 1e-3

    state["transformer_blocks.3.attn.to_q.lora_A.weight"] = torch.randn(RANK, 32, generator=gen)
    FluxPipeline.save_lora_weights(tmp_path / "bad", transformer_lora_layers=state)
    other = fresh(base_pipe)
    with pytest.raises(LoraLoadError, match=r"does not exist.*transformer\.transformer_blocks\.3\.attn\.to_q\.lora_A"):
        S.load_lora(other, tmp_path / "bad")
    assert lora_layer_count(other) == 0
