"""SD2 / SDXL single-file layouts: tiny models, round trips, diffusers' own loader as the independent
check, OpenCLIP semantics, WebUI layer names, family detection and the offline loader."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.backbones import loading, tiny
from lora_trainer.backbones.ldm_keys import (
    SD2_LAYOUT,
    SDXL_LAYOUT,
    CheckpointKeyError,
    UnsupportedCheckpointError,
    components_to_ldm,
    detect_family_and_variant,
    layout_for,
    ldm_to_components,
    ldm_to_diffusers,
    unet_ldm_module_name,
)
from lora_trainer.lora.kohya_names import kohya_name, webui_candidate_names

LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
MODELS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
          "sd2-v": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def built():
    """family -> tiny components (no tokenizers: the writers make the files themselves)."""
    return {family: tiny.build_tiny(family, seed=0, with_tokenizer=False) for family in ("sd2", "sdxl")}


@pytest.fixture(scope="module")
def files(built, tmp_path_factory):
    """family -> (single file, config folder); the folder is the file's `<stem>.config/` sibling."""
    root = tmp_path_factory.mktemp("sd2_sdxl")
    out = {}
    for family, components in built.items():
        path = tiny.write_single_file(root / f"tiny-{family}.safetensors", components)
        folder = tiny.write_config_folder(root / f"tiny-{family}.config", components["configs"])
        out[family] = (path, folder)
    return out


def _state_dicts(components, family):
    return {name: components[name].state_dict() for name in MODELS[family]}


def _ldm(components, family):
    return components_to_ldm(_state_dicts(components, family), components["configs"], layout_for(family),
                             components.get("extras"))


def _assert_same_state(expected_model, actual_model, what):
    expected, actual = expected_model.state_dict(), actual_model.state_dict()
    assert expected.keys() == actual.keys(), f"{what}: key sets differ: {sorted(expected.keys() ^ actual.keys())[:8]}"
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{what}: tensors differ: {different[:8]}"


def _count(keys, prefix):
    return sum(k.startswith(prefix) for k in keys)


# --- the tiny models -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_tiny_model_is_deterministic_and_has_no_zero_tensors(built, family):
    again = tiny.build_tiny(family, seed=0, with_tokenizer=False)
    for name in MODELS[family]:
        _assert_same_state(built[family][name], again[name], name)
        assert all(torch.count_nonzero(p) for p in again[name].parameters()), f"{name} has an all-zero tensor"
    for component, tensors in again["extras"].items():
        assert all(torch.equal(t, built[family]["extras"][component][k]) for k, t in tensors.items())
    other = tiny.build_tiny(family, seed=1, with_tokenizer=False)
    assert not torch.equal(other["unet"].conv_in.weight, again["unet"].conv_in.weight)


def test_tiny_sdxl_has_the_prototype_checkpoint_layout(built):
    """Same tensors as the tiny SGM checkpoint the real WebUI loaded (reference Part 2)."""
    ldm = _ldm(built["sdxl"], "sdxl")
    assert _count(ldm, "model.diffusion_model.") == 618
    assert _count(ldm, "first_stage_model.") == 176
    assert _count(ldm, "conditioner.embedders.0.transformer.") == 37
    assert _count(ldm, "conditioner.embedders.1.model.") == 30
    unet = "model.diffusion_model."
    blocks = {int(k.split(".")[3]) for k in ldm if k.startswith(unet + "input_blocks.") and ".1.transformer_blocks." in k}
    assert blocks == {4, 5, 7, 8}  # no attention at the first level
    assert unet + "input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight" in ldm  # depth 2 at the last level
    assert unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert unet + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" not in ldm
    assert unet + "middle_block.1.transformer_blocks.1.attn1.to_q.weight" in ldm  # the WebUI tells SDXL from SSD by it
    out_attention = {int(k.split(".")[3]) for k in ldm if k.startswith(unet + "output_blocks.") and ".1.proj_in." in k}
    assert out_attention == {0, 1, 2, 3, 4, 5}
    assert unet + "output_blocks.2.2.conv.weight" in ldm and unet + "output_blocks.5.2.conv.weight" in ldm
    shapes = {
        unet + "label_emb.0.0.weight": (128, 1600),
        unet + "label_emb.0.2.weight": (128, 128),
        unet + "input_blocks.4.1.proj_in.weight": (64, 64),  # linear projection
        unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 96),  # context 32 + 64
        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight": (192, 64),
        "conditioner.embedders.1.model.text_projection": (64, 64),
        "conditioner.embedders.1.model.positional_embedding": (77, 64),
        "conditioner.embedders.1.model.logit_scale": (),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    }
    for key, shape in shapes.items():
        assert tuple(ldm[key].shape) == shape, key
    assert "conditioner.embedders.1.model.ln_final.weight" in ldm  # the WebUI's SDXL marker key


def test_tiny_sd2_layout(built):
    ldm = _ldm(built["sd2"], "sd2")
    unet, te = "model.diffusion_model.", "cond_stage_model.model."
    assert tuple(ldm[unet + "input_blocks.1.1.proj_in.weight"].shape) == (32, 32)  # Linear, not 1x1 conv
    assert tuple(ldm[unet + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (64, 64)
    # diffusers keeps 2 text layers; the file holds the whole 3-resblock tower like real SD2's 24 for 23.
    assert {int(k.split(".")[4]) for k in ldm if k.startswith(te + "transformer.resblocks.")} == {0, 1, 2}
    assert built["sd2"]["text_encoder"].config.num_hidden_layers == 2
    assert tuple(ldm[te + "transformer.resblocks.2.attn.in_proj_weight"].shape) == (192, 64)
    assert tuple(ldm[te + "transformer.resblocks.0.mlp.c_fc.weight"].shape) == (256, 64)
    assert tuple(ldm[te + "text_projection"].shape) == (64, 64) and ldm[te + "logit_scale"].ndim == 0
    assert _count(ldm, te) == 3 * 12 + 6
    assert not any(k.startswith("cond_stage_model.transformer.") for k in ldm)


# --- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_round_trip_is_lossless(built, family):
    components = built[family]
    ldm = _ldm(components, family)
    split = ldm_to_components(ldm, components["configs"], layout_for(family))
    for name in MODELS[family]:
        original = components[name].state_dict()
        assert split.state_dicts[name].keys() == original.keys(), name
        assert all(torch.equal(split.state_dicts[name][k], original[k]) for k in original), name
    again = components_to_ldm(split.state_dicts, components["configs"], layout_for(family), split.extras)
    assert again.keys() == ldm.keys()
    assert all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_sd2_surplus_layer_is_set_aside_not_an_error(built):
    components = built["sd2"]
    ldm = _ldm(components, "sd2")
    configs = components["configs"]
    split = ldm_to_components(ldm, configs, SD2_LAYOUT)
    assert sorted(split.extras["text_encoder"]) == sorted(components["extras"]["text_encoder"])
    # Without a text-encoder config SD2 drops the last resblock by rule; the old 3-tuple API agrees.
    _, _, te_sd = ldm_to_diffusers(ldm, configs["unet"], configs["vae"], layout=SD2_LAYOUT)
    assert te_sd.keys() == components["text_encoder"].state_dict().keys()
    too_many = dict(configs["text_encoder"], num_hidden_layers=4)
    with pytest.raises(CheckpointKeyError, match="3 layers.*wants 4"):
        ldm_to_components(ldm, dict(configs, text_encoder=too_many), SD2_LAYOUT)


def test_sdxl_open_clip_surplus_layers_are_an_error(built):
    """SDXL's OpenCLIP is used whole (pooled output): fewer layers in the config is a mismatch."""
    configs = dict(built["sdxl"]["configs"])
    configs["text_encoder_2"] = dict(configs["text_encoder_2"], num_hidden_layers=1)
    with pytest.raises(CheckpointKeyError, match="2 layers.*only 1"):
        ldm_to_components(_ldm(built["sdxl"], "sdxl"), configs, SDXL_LAYOUT)


def test_unknown_open_clip_keys_are_named(built):
    ldm = dict(_ldm(built["sdxl"], "sdxl"))
    ldm["conditioner.embedders.1.model.transformer.resblocks.0.attn.mystery"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="resblocks.0.attn.mystery"):
        ldm_to_components(ldm, built["sdxl"]["configs"], SDXL_LAYOUT)
    te_sd = dict(built["sdxl"]["text_encoder_2"].state_dict())
    del te_sd["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointKeyError, match=r"layers\.0\.self_attn\.\{q,k,v\}_proj\.weight"):
        components_to_ldm({"text_encoder_2": te_sd}, None, SDXL_LAYOUT)


def test_sgm_extra_buffers_are_ignored(built):
    ldm = dict(_ldm(built["sdxl"], "sdxl"), **{"denoiser.sigmas": torch.ones(1000), "alphas_cumprod": torch.ones(1000)})
    split = ldm_to_components(ldm, built["sdxl"]["configs"], SDXL_LAYOUT)
    assert split.state_dicts["unet"].keys() == built["sdxl"]["unet"].state_dict().keys()


# --- OpenCLIP semantics: a plain-torch open_clip text tower on the converted tensors ---------


def _open_clip_tower(tensors, prefix, ids, run_layers):
    """open_clip's TextTransformer forward (nn.MultiheadAttention with fused in_proj, causal mask,
    exact GELU) on the checkpoint's tensors: returns (output after run_layers blocks, all blocks' output)."""
    width = tensors[prefix + "token_embedding.weight"].shape[1]
    heads = width // 32  # both tiny towers use 2 heads of 32
    x = tensors[prefix + "token_embedding.weight"][ids] + tensors[prefix + "positional_embedding"]
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    layers = len({k[len(prefix):].split(".")[2] for k in tensors if k.startswith(prefix + "transformer.resblocks.")})
    outputs = []
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({name: tensors[block + "attn." + name] for name in
                                   ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
        ln = lambda t, n: torch.nn.functional.layer_norm(t, (width,), tensors[block + n + ".weight"],  # noqa: E731
                                                         tensors[block + n + ".bias"])
        h = ln(x, "ln_1")
        x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = torch.nn.functional.linear(ln(x, "ln_2"), tensors[block + "mlp.c_fc.weight"], tensors[block + "mlp.c_fc.bias"])
        x = x + torch.nn.functional.linear(torch.nn.functional.gelu(h), tensors[block + "mlp.c_proj.weight"],
                                           tensors[block + "mlp.c_proj.bias"])
        outputs.append(x)
    return outputs[run_layers - 1], outputs[-1]


def _ln_final(tensors, prefix, x):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), tensors[prefix + "ln_final.weight"],
                                          tensors[prefix + "ln_final.bias"])


@torch.no_grad()
def test_sd2_text_encoder_equals_open_clip_penultimate_layer(built):
    """The WebUI's SD2 conditioning: OpenCLIP up to the penultimate resblock, then ln_final."""
    ldm = _ldm(built["sd2"], "sd2")
    prefix = "cond_stage_model.model."
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    penultimate, _ = _open_clip_tower(ldm, prefix, ids, run_layers=2)
    expected = _ln_final(ldm, prefix, penultimate)
    actual = built["sd2"]["text_encoder"](ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sdxl_second_text_encoder_equals_open_clip(built):
    """SDXL's OpenCLIP embedder: penultimate hidden states (no ln_final) for cross-attention and
    ln_final(last layer) at the end token @ text_projection for the pooled vector."""
    ldm = _ldm(built["sdxl"], "sdxl")
    prefix = "conditioner.embedders.1.model."
    ids = torch.tensor([[49406, 320, 2368, 49407] + [0] * 73])
    penultimate, last = _open_clip_tower(ldm, prefix, ids, run_layers=1)
    pooled = _ln_final(ldm, prefix, last)[:, 3] @ ldm[prefix + "text_projection"]
    out = built["sdxl"]["text_encoder_2"](ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], penultimate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, pooled, rtol=1e-5, atol=1e-5)


# --- the independent check: diffusers' own single-file loader --------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_diffusers_single_file_loader_reads_our_checkpoint(built, files, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path, config_folder = files[family]
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_class.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    for name in MODELS[family]:
        _assert_same_state(built[family][name], getattr(pipe, name), name)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    # OpenCLIP tokenizers pad with "!" (id 0), OpenAI CLIP's with <|endoftext|>.
    openclip_tokenizer = pipe.tokenizer_2 if family == "sdxl" else pipe.tokenizer
    assert openclip_tokenizer("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    if family == "sdxl":
        assert pipe.tokenizer("a cat", padding="max_length", max_length=6).input_ids[-1] == 49407


def test_diffusers_reads_a_v_prediction_sd2(tmp_path):
    from diffusers import StableDiffusionPipeline

    components = tiny.build_tiny("sd2-v", seed=3, with_tokenizer=False)
    path = tiny.write_single_file(tmp_path / "v.safetensors", components)
    folder = tiny.write_config_folder(tmp_path / "v.config", components["configs"])
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    _assert_same_state(components["unet"], pipe.unet, "unet")
    _assert_same_state(components["text_encoder"], pipe.text_encoder, "text_encoder")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_sdxl_config_folder_layout(files):
    _, folder = files["sdxl"]
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    tokenizer_files = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    assert found == {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "text_encoder_2/config.json", "scheduler/scheduler_config.json",
                     *(f"tokenizer/{n}" for n in tokenizer_files), *(f"tokenizer_2/{n}" for n in tokenizer_files)}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


# --- WebUI layer names -----------------------------------------------------------------------


def _webui_layer_names(keys) -> set[str]:
    """Layer names as the WebUI's network_layer_mapping has them: the UNet under diffusion_model_,
    SD1/SD2 text encoders under cond_stage_model's wrapped module, SDXL's as `<embedder index>_...`."""
    names = set()
    for key in keys:
        module = key.rsplit(".", 1)[0]
        for prefix, replacement in (("model.diffusion_model.", "diffusion_model."), ("cond_stage_model.", ""),
                                    ("conditioner.embedders.", "")):
            if module.startswith(prefix):
                names.add((replacement + module[len(prefix):]).replace(".", "_"))
                break
    return names


def _first_hit(candidates, layers):
    return next((name for name in candidates if name in layers), None)


def _lora_modules(model):
    return [name for name, module in model.named_modules() if isinstance(module, LORA_LAYER_TYPES)]


def test_sdxl_sgm_native_unet_names_hit_webui_layers(built, files):
    """lora_unet_input_blocks_4_1_... (SGM-native kohya names) -> diffusion_model_input_blocks_4_1_..."""
    path, _ = files["sdxl"]
    layers = _webui_layer_names(load_file(str(path)).keys())
    config = built["sdxl"]["configs"]["unet"]
    modules = _lora_modules(built["sdxl"]["unet"])
    assert len(modules) > 200
    for module in modules:
        ldm_path = unet_ldm_module_name(module, config)
        key = "lora_unet_" + ldm_path.replace(".", "_")
        assert _first_hit(webui_candidate_names(key), layers) == "diffusion_model_" + ldm_path.replace(".", "_"), module
    assert "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in layers


def test_sdxl_diffusers_style_unet_names_miss_three_layers(built, files):
    """The WebUI's diffusers-name rules assume SD1's layout: for SDXL they miss add_embedding and the
    first upsampler (SD1's lowest up level has no attention; SDXL's has) -- use SGM-native names."""
    path, _ = files["sdxl"]
    layers = _webui_layer_names(load_file(str(path)).keys())
    config = built["sdxl"]["configs"]["unet"]
    missed = []
    for module in _lora_modules(built["sdxl"]["unet"]):
        expected = "diffusion_model_" + unet_ldm_module_name(module, config).replace(".", "_")
        if _first_hit(webui_candidate_names(kohya_name("lora_unet", module)), layers) != expected:
            missed.append(module)
    assert missed == ["add_embedding.linear_1", "add_embedding.linear_2", "up_blocks.0.upsamplers.0.conv"]


def test_sdxl_text_encoder_names_hit_webui_layers(built, files):
    path, _ = files["sdxl"]
    layers = _webui_layer_names(load_file(str(path)).keys())
    for module in _lora_modules(built["sdxl"]["text_encoder"]):
        full = module if module.startswith("text_model.") else "text_model." + module
        expected = "0_transformer_" + full.replace(".", "_")
        assert _first_hit(webui_candidate_names(kohya_name("lora_te1", module)), layers) == expected, module
    _check_open_clip_names(built["sdxl"]["text_encoder_2"], "lora_te2", "1_model_transformer_resblocks_", layers, False)


def test_sd2_text_encoder_names_hit_the_multihead_attention(built, files):
    """lora_te_..._self_attn_q_proj -> model_transformer_resblocks_N_attn (the WebUI's SD2 rule + its
    x_proj fallback). The WebUI patches that MultiheadAttention only when q, k, v and out all exist."""
    path, _ = files["sd2"]
    layers = _webui_layer_names(load_file(str(path)).keys())
    _check_open_clip_names(built["sd2"]["text_encoder"], "lora_te", "model_transformer_resblocks_", layers, True)
    # The SD2 UNet keeps SD1's block layout: diffusers-style names resolve everywhere.
    config = built["sd2"]["configs"]["unet"]
    for module in _lora_modules(built["sd2"]["unet"]):
        expected = "diffusion_model_" + unet_ldm_module_name(module, config).replace(".", "_")
        assert _first_hit(webui_candidate_names(kohya_name("lora_unet", module), is_sd2=True), layers) == expected


def _check_open_clip_names(text_encoder, prefix, webui_prefix, layers, is_sd2):
    by_layer: dict[str, dict[str, str]] = {}
    for module in _lora_modules(text_encoder):
        if ".layers." not in module:
            continue  # text_projection (CLIPTextModelWithProjection): not a LoRA target
        parts = module.removeprefix("text_model.").split(".")  # encoder.layers.N.<child...>
        by_layer.setdefault(parts[2], {})[".".join(parts[3:])] = kohya_name(prefix, module)
    assert len(by_layer) == text_encoder.config.num_hidden_layers
    for index, names in by_layer.items():
        attention = f"{webui_prefix}{index}_attn"
        assert attention in layers  # the MultiheadAttention (owns in_proj_weight)
        for child in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert _first_hit(webui_candidate_names(names[child], is_sd2=is_sd2), layers) == attention, child
        # the WebUI looks up `<attention layer>_out_proj` in the LoRA when patching the attention
        assert _first_hit(webui_candidate_names(names["self_attn.out_proj"], is_sd2=is_sd2), layers) == \
            attention + "_out_proj"
        assert _first_hit(webui_candidate_names(names["mlp.fc1"], is_sd2=is_sd2), layers) == f"{webui_prefix}{index}_mlp_c_fc"
        assert _first_hit(webui_candidate_names(names["mlp.fc2"], is_sd2=is_sd2), layers) == f"{webui_prefix}{index}_mlp_c_proj"


# --- family detection ------------------------------------------------------------------------


def test_family_detection_on_tiny_files(files, tmp_path):
    expected = {"sd2": ("sd2", "OpenCLIP, 64-wide, 3 resblocks"),
                "sdxl": ("sdxl", "conditioner.embedders.1 = OpenCLIP, 64-wide, 2 resblocks")}
    for family, (path, _) in files.items():
        shapes, _ = loading.read_key_shapes(path)
        detected = detect_family_and_variant(shapes)
        assert detected.family == expected[family][0]
        assert expected[family][1] in detected.description
    sd1 = tiny.write_single_file(tmp_path / "sd1.safetensors", tiny.build_tiny("sd1", with_tokenizer=False))
    assert detect_family_and_variant(loading.read_key_shapes(sd1)[0]).family == "sd1"


@pytest.fixture(scope="module")
def real_size():
    """family -> (LDM/SGM key -> meta tensor) for SD1.5, SD2.1 and SDXL base from the shipped configs."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        configs = tiny.load_config_dicts(tiny.SHIPPED_CONFIG_DIRS[family])
        with torch.device("meta"):
            models = tiny.build_models_from_configs(configs, rerandomise_zeros=False)
        out[family] = (components_to_ldm({n: m.state_dict() for n, m in models.items()}, configs, layout_for(family)),
                       models, configs)
    return out


def test_family_detection_on_real_size_key_sets(real_size):
    from diffusers.loaders import single_file_utils

    expected = {
        "sd1": ("HF CLIP, 768-wide, 12 layers", "cross-attention 768", "v1"),
        "sd2": ("OpenCLIP, 1024-wide, 23 resblocks", "cross-attention 1024, linear proj_in", "v2"),
        "sdxl": ("OpenCLIP, 1280-wide, 32 resblocks", "label_emb 2816", "xl_base"),
    }
    for family, (ldm, _, _) in real_size.items():
        detected = detect_family_and_variant({k: tuple(t.shape) for k, t in ldm.items()})
        text, unet, diffusers_name = expected[family]
        assert detected.family == family
        assert text in detected.description and unet in detected.description, detected.description
        assert single_file_utils.infer_diffusers_model_type(ldm) == diffusers_name  # diffusers agrees
    # Without text-encoder keys the UNet decides.
    for family, (ldm, _, _) in real_size.items():
        unet_only = {k: t for k, t in ldm.items() if k.startswith("model.diffusion_model.")}
        detected = detect_family_and_variant(unet_only)
        assert detected.family == family and "UNet alone" in detected.description


def test_family_detection_refuses_what_it_cannot_load(real_size):
    sdxl = real_size["sdxl"][0]
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): t for k, t in sdxl.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(UnsupportedCheckpointError, match="refiner"):
        detect_family_and_variant(refiner)
    with pytest.raises(UnsupportedCheckpointError, match="cannot tell"):
        detect_family_and_variant({"foo.bar.weight": (1,), "transformer.x": (2,)})


def test_real_size_key_counts_and_shapes(real_size):
    """Counts of the released files: SD2.1 OpenCLIP-H has 24 x 12 + 6 tensors (diffusers keeps 23
    layers and no projection/logit scale); sd_xl_base_1.0 has 1680 UNet and 390 OpenCLIP-bigG tensors."""
    sd2, sdxl = real_size["sd2"][0], real_size["sdxl"][0]
    assert _count(sd2, "model.diffusion_model.") == 686 and _count(sd2, "first_stage_model.") == 248
    assert _count(sd2, "cond_stage_model.model.") == 23 * 12 + 4
    assert _count(sdxl, "model.diffusion_model.") == 1680 and _count(sdxl, "first_stage_model.") == 248
    assert _count(sdxl, "conditioner.embedders.0.transformer.") == 197
    assert _count(sdxl, "conditioner.embedders.1.model.") == 390 - 1  # the file adds logit_scale
    shapes = {  # (family, key): shape
        ("sd2", "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"): (3072, 1024),
        ("sd2", "model.diffusion_model.input_blocks.1.1.proj_in.weight"): (320, 320),
        ("sd2", "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"): (320, 1024),
        ("sdxl", "model.diffusion_model.label_emb.0.0.weight"): (1280, 2816),
        ("sdxl", "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"): (1280, 2048),
        ("sdxl", "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight"): (1280, 5120),
        ("sdxl", "model.diffusion_model.output_blocks.2.2.conv.weight"): (1280, 1280, 3, 3),
        ("sdxl", "model.diffusion_model.output_blocks.8.0.skip_connection.weight"): (320, 640, 1, 1),
        ("sdxl", "conditioner.embedders.1.model.text_projection"): (1280, 1280),
        ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"): (5120, 1280),
    }
    for (family, key), shape in shapes.items():
        assert tuple(real_size[family][0][key].shape) == shape, key


def test_real_size_layouts_agree_with_diffusers_converters(real_size):
    """diffusers' own LDM -> diffusers converters undo our mapping for SD2.1 and SDXL (names and shapes)."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    for family, prefix, te_name in (("sd2", "cond_stage_model.model.", "text_encoder"),
                                    ("sdxl", "conditioner.embedders.1.model.", "text_encoder_2")):
        ldm, models, configs = real_size[family]
        converted = {"unet": single_file_utils.convert_ldm_unet_checkpoint(ldm, dict(configs["unet"])),
                     "vae": single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(configs["vae"]))}
        te = single_file_utils.convert_open_clip_checkpoint(models[te_name], ldm, prefix=prefix)
        if not any(k.startswith("text_model.") for k in models[te_name].state_dict()):
            te = {k.removeprefix("text_model."): v for k, v in te.items()}
        converted[te_name] = te
        for name, state in converted.items():
            original = {k: v for k, v in models[name].state_dict().items() if not k.endswith("position_ids")}
            assert state.keys() == original.keys(), (family, name, sorted(state.keys() ^ original.keys())[:4])
            assert all(state[k].shape == original[k].shape for k in original), (family, name)


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_loader_reads_tiny_single_files(built, files, family, tmp_path):
    path, _ = files[family]
    parts = loading.load_single_file(path)
    expected_keys = {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config", "family", "source", "source_hash",
                     "detected", "reload"}
    if family == "sdxl":
        expected_keys |= {"text_encoder_2", "tokenizer_2"}
    assert set(parts) == expected_keys
    for name in MODELS[family]:
        _assert_same_state(built[family][name], parts[name], name)
    assert parts["family"].name == family
    assert f"{family.upper()} (" in parts["detected"] and "beside the file" in parts["detected"]
    assert parts["tokenizer"]("a", padding="max_length", max_length=4).input_ids[-1] == (0 if family == "sd2" else 49407)
    # The converted q/k/v views were given their own storage: the model saves with safetensors.
    te = parts["text_encoder_2" if family == "sdxl" else "text_encoder"]
    te.save_pretrained(tmp_path / "te", safe_serialization=True)


def test_loader_reads_an_sdxl_diffusers_folder(built, tmp_path):
    folder = tiny.write_diffusers_folder(tmp_path / "xl", built["sdxl"])
    parts = loading.load_folder(folder)
    for name in MODELS["sdxl"]:
        _assert_same_state(built["sdxl"][name], parts[name], name)
    assert parts["family"].name == "sdxl" and parts["tokenizer_2"].pad_token == "!"


def test_sd2_prediction_type_rules(files, tmp_path):
    source, folder = files["sd2"]
    path = tmp_path / "model.safetensors"
    shutil.copyfile(source, path)
    info = loading.describe_model(str(path))  # no hint at all
    assert (info.variant, info.prediction_type) == ("sd2-v", "v_prediction") and "assumed" in info.config_reason
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert loading.describe_model(str(path)).variant == "sd2-v"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    info = loading.describe_model(str(path))
    assert (info.variant, info.prediction_type) == ("sd2", "epsilon") and "model.yaml" in info.config_reason
    info = loading.describe_model(str(path), base_model_config=str(tiny.SHIPPED_CONFIG_DIRS["sd2-v"]))
    assert (info.variant, info.prediction_type) == ("custom", "v_prediction")  # explicit beats the yaml
    shutil.copytree(folder, path.with_suffix(".config"))
    info = loading.describe_model(str(path))
    assert info.prediction_type == "epsilon" and "model.config/" in info.config_reason
    assert "OpenCLIP, 64-wide" in info.description


def test_loader_refuses_a_config_folder_of_another_family(files):
    from lora_trainer.backbones.diffusers_sd import ModelLoadError

    path, _ = files["sdxl"]
    with pytest.raises(ModelLoadError, match="holds sd1 configs, but .* is sdxl"):
        loading.describe_model(str(path), base_model_config=str(tiny.SHIPPED_CONFIG_DIRS["sd1"]))
