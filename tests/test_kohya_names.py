"""kohya LoRA names land on real WebUI layers, for the tiny model and the real SD1.5 layout."""

import pytest
import torch
from safetensors import safe_open

from lora_trainer.backbones.ldm_keys import unet_ldm_module_name
from lora_trainer.backbones.tiny import build_models_from_configs, build_tiny_sd1, load_config_dicts, write_single_file
from lora_trainer.lora.kohya_names import (
    kohya_name,
    ldm_path_to_kohya_diffusers,
    split_kohya_key,
    webui_candidate_names,
    webui_compvis_name,
)

LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


# --- pure naming rules -----------------------------------------------------------------------


def test_kohya_name():
    assert kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert kohya_name("lora_unet_", "conv_in") == "lora_unet_conv_in"
    # transformers >= 5.6 module names lack "text_model."; kohya names always have it.
    assert kohya_name("lora_te", "encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("lora_te_", "text_model.encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_name("lora_te2", "encoder.layers.3.mlp.fc2") == "lora_te2_text_model_encoder_layers_3_mlp_fc2"


def test_split_kohya_key():
    assert split_kohya_key("lora_unet_conv_in.lora_down.weight") == ("lora_unet_conv_in", "lora_down.weight")
    assert split_kohya_key("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")[1] == "alpha"


@pytest.mark.parametrize("kohya, compvis", [
    ("lora_unet_conv_in", "diffusion_model_input_blocks_0_0"),
    ("lora_unet_conv_out", "diffusion_model_out_2"),
    ("lora_unet_time_embedding_linear_1", "diffusion_model_time_embed_0"),
    ("lora_unet_time_embedding_linear_2", "diffusion_model_time_embed_2"),
    ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
     "diffusion_model_input_blocks_2_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "diffusion_model_input_blocks_4_0_skip_connection"),
    ("lora_unet_down_blocks_2_resnets_1_time_emb_proj", "diffusion_model_input_blocks_8_0_emb_layers_1"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "diffusion_model_input_blocks_3_0_op"),
    ("lora_unet_mid_block_attentions_0_proj_out", "diffusion_model_middle_block_1_proj_out"),
    ("lora_unet_mid_block_resnets_1_conv2", "diffusion_model_middle_block_2_out_layers_3"),
    ("lora_unet_up_blocks_0_resnets_2_conv1", "diffusion_model_output_blocks_2_0_in_layers_2"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
     "diffusion_model_output_blocks_11_1_transformer_blocks_0_ff_net_2"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "diffusion_model_output_blocks_5_2_conv"),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj",
     "transformer_text_model_encoder_layers_11_self_attn_out_proj"),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "1_model_transformer_resblocks_3_mlp_c_fc"),
    ("lora_unet_conv_norm_out", "lora_unet_conv_norm_out"),  # no rule: returned unchanged
])
def test_webui_compvis_name(kohya, compvis):
    assert webui_compvis_name(kohya) == compvis
    assert webui_compvis_name(kohya + ".lora_up.weight") == compvis


def test_webui_compvis_name_sd2_text_encoder():
    assert webui_compvis_name("lora_te_text_model_encoder_layers_2_mlp_fc2", is_sd2=True) == \
        "model_transformer_resblocks_2_mlp_c_proj"
    assert webui_compvis_name("lora_te_text_model_encoder_layers_2_self_attn_k_proj", is_sd2=True) == \
        "model_transformer_resblocks_2_attn_k_proj"


def test_webui_candidate_names_order():
    # SD2's MultiheadAttention: the q/k/v name falls back to its parent.
    assert webui_candidate_names("lora_te_text_model_encoder_layers_2_self_attn_q_proj", is_sd2=True) == [
        "model_transformer_resblocks_2_attn_q_proj", "model_transformer_resblocks_2_attn"]
    # compvis-style UNet names (SDXL trainers write those) fall back to a plain prefix swap.
    assert webui_candidate_names("lora_unet_input_blocks_4_1_proj_in") == [
        "lora_unet_input_blocks_4_1_proj_in", "diffusion_model_input_blocks_4_1_proj_in"]
    assert webui_candidate_names("lora_te1_text_model_encoder_layers_0_mlp_fc1") == [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "0_transformer_text_model_encoder_layers_0_mlp_fc1",
        "transformer_text_model_encoder_layers_0_mlp_fc1"]


@pytest.mark.parametrize("ldm_path, kohya", [
    ("input_blocks.2.1.transformer_blocks.0.attn1.to_q", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"),
    ("model.diffusion_model.input_blocks.0.0", "lora_unet_conv_in"),
    ("diffusion_model.out.2", "lora_unet_conv_out"),
    ("time_embed.2", "lora_unet_time_embedding_linear_2"),
    ("input_blocks.6.0.op", "lora_unet_down_blocks_1_downsamplers_0_conv"),
    ("input_blocks.4.0.skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"),
    ("middle_block.0.emb_layers.1", "lora_unet_mid_block_resnets_0_time_emb_proj"),
    ("middle_block.1.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("middle_block.2.out_layers.3", "lora_unet_mid_block_resnets_1_conv2"),
    ("output_blocks.2.1.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
    ("output_blocks.8.2.conv", "lora_unet_up_blocks_2_upsamplers_0_conv"),
    ("output_blocks.8.1.proj_out", "lora_unet_up_blocks_2_attentions_2_proj_out"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    ("transformer.text_model.encoder.layers.5.self_attn.v_proj", "lora_te_text_model_encoder_layers_5_self_attn_v_proj"),
])
def test_ldm_path_to_kohya_diffusers(ldm_path, kohya):
    assert ldm_path_to_kohya_diffusers(ldm_path) == kohya


@pytest.mark.parametrize("bad", ["input_blocks.1.0.in_layers.1", "input_blocks.3.1.proj_in", "middle_block.3.x",
                                 "output_blocks.1.3.conv", "label_emb.0.0"])
def test_ldm_path_without_diffusers_name(bad):
    with pytest.raises(ValueError):
        ldm_path_to_kohya_diffusers(bad)


# --- every LoRA-able layer of a real checkpoint ----------------------------------------------


def _webui_layer_names(ldm_keys) -> set[str]:
    """Layer names as the WebUI's network_layer_mapping has them, from single-file keys."""
    names = set()
    for key in ldm_keys:
        module = key.rsplit(".", 1)[0]
        if module.startswith("model.diffusion_model."):
            module = "diffusion_model_" + module[len("model.diffusion_model."):]
        elif module.startswith("cond_stage_model.transformer."):
            module = "transformer_" + module[len("cond_stage_model.transformer."):]
        else:
            continue
        names.add(module.replace(".", "_"))
    return names


def _first_hit(candidates, layers):
    return next((name for name in candidates if name in layers), None)


def _lora_modules(model):
    return [name for name, module in model.named_modules() if isinstance(module, LORA_LAYER_TYPES)]


def _check_unet_names(unet, unet_config, layers):
    modules = _lora_modules(unet)
    assert modules
    for module in modules:
        key = kohya_name("lora_unet", module)
        ldm_path = unet_ldm_module_name(module, unet_config)
        expected = "diffusion_model_" + ldm_path.replace(".", "_")
        assert _first_hit(webui_candidate_names(key), layers) == expected, module
        assert ldm_path_to_kohya_diffusers(ldm_path) == key


def _check_text_encoder_names(text_encoder, layers):
    modules = _lora_modules(text_encoder)
    assert modules
    for module in modules:
        key = kohya_name("lora_te", module)
        full_path = module if module.startswith("text_model.") else "text_model." + module
        expected = "transformer_" + full_path.replace(".", "_")
        assert _first_hit(webui_candidate_names(key), layers) == expected, module
        assert ldm_path_to_kohya_diffusers("cond_stage_model.transformer." + full_path) == key


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tiny = build_tiny_sd1(seed=0, with_tokenizer=False)
    path = write_single_file(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", tiny)
    with safe_open(str(path), "pt") as handle:
        layers = _webui_layer_names(handle.keys())
    return tiny, layers


def test_tiny_unet_lora_names_hit_webui_layers(tiny_checkpoint):
    tiny, layers = tiny_checkpoint
    _check_unet_names(tiny["unet"], tiny["configs"]["unet"], layers)


def test_tiny_text_encoder_lora_names_hit_webui_layers(tiny_checkpoint):
    tiny, layers = tiny_checkpoint
    _check_text_encoder_names(tiny["text_encoder"], layers)


def test_sd15_lora_names_hit_webui_layers():
    """The same on the real SD1.5 layout (meta tensors: names and shapes only)."""
    from lora_trainer.backbones.ldm_keys import diffusers_to_ldm

    configs = load_config_dicts()
    with torch.device("meta"):
        models = build_models_from_configs(configs, rerandomise_zeros=False)
    ldm = diffusers_to_ldm(models["unet"].state_dict(), None, models["text_encoder"].state_dict(),
                           configs["unet"], None)
    layers = _webui_layer_names(ldm)
    _check_unet_names(models["unet"], configs["unet"], layers)
    _check_text_encoder_names(models["text_encoder"], layers)
