"""diffusers <-> LDM single-file key mapping, checked against diffusers' own single-file loader."""

import os
import time

import pytest
import torch
from safetensors import safe_open

from lora_trainer.backbones.ldm_keys import (
    CheckpointKeyError,
    diffusers_to_ldm,
    ldm_to_diffusers,
    unet_diffusers_module_name,
    unet_ldm_module_name,
)
from lora_trainer.backbones.tiny import (
    build_models_from_configs,
    build_tiny_sd1,
    load_config_dicts,
    tiny_sd1_configs,
    write_config_folder,
    write_diffusers_folder,
    write_single_file,
)

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd1(seed=0, with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_ldm(tiny):
    return _to_ldm(tiny, tiny["configs"])


@pytest.fixture(scope="module")
def single_file(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    path = write_single_file(root / "tiny.safetensors", tiny)
    config_folder = write_config_folder(root / "config", tiny["configs"])
    return path, config_folder


def _to_ldm(models, configs):
    return diffusers_to_ldm(models["unet"].state_dict(), models["vae"].state_dict(),
                            models["text_encoder"].state_dict(), configs["unet"], configs["vae"])


def _assert_same_state(expected_model, actual_model, what):
    expected, actual = expected_model.state_dict(), actual_model.state_dict()
    assert expected.keys() == actual.keys(), f"{what}: key sets differ: {sorted(expected.keys() ^ actual.keys())[:8]}"
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{what}: tensors differ: {different[:8]}"


# --- tiny model ------------------------------------------------------------------------------


def test_tiny_model_is_fast_deterministic_and_has_no_zero_tensors(tiny):
    start = time.perf_counter()
    again = build_tiny_sd1(seed=0, with_tokenizer=False)
    assert time.perf_counter() - start < 2.0  # ~0.1 s warm; generous for busy 2-core machines
    assert again["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    for name in COMPONENTS:
        _assert_same_state(tiny[name], again[name], name)
        assert all(torch.count_nonzero(p) for p in again[name].parameters()), f"{name} has an all-zero tensor"
    other = build_tiny_sd1(seed=1, with_tokenizer=False)
    assert not torch.equal(other["unet"].conv_in.weight, tiny["unet"].conv_in.weight)


def test_tiny_model_keeps_the_sd1_block_layout(tiny_ldm):
    unet_keys = {k for k in tiny_ldm if k.startswith("model.diffusion_model.")}
    # SD1: input blocks 1,2 have attention, 3 is the downsampler, 4,5 are plain resnets.
    assert "model.diffusion_model.input_blocks.2.1.proj_in.weight" in unet_keys
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in unet_keys
    assert "model.diffusion_model.input_blocks.4.0.skip_connection.weight" in unet_keys
    assert not any(k.startswith("model.diffusion_model.input_blocks.4.1.") for k in unet_keys)
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in unet_keys
    # First up level: no attention, upsampler in slot 1. Second level: attention, no upsampler.
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in unet_keys
    assert "model.diffusion_model.output_blocks.5.1.proj_out.weight" in unet_keys
    assert max(int(k.split(".")[3]) for k in unet_keys if ".output_blocks." in k) == 5


# --- conversion ------------------------------------------------------------------------------


def test_round_trip_is_lossless(tiny, tiny_ldm):
    unet_sd, vae_sd, te_sd = ldm_to_diffusers(tiny_ldm, tiny["configs"]["unet"], tiny["configs"]["vae"])
    for name, converted in zip(COMPONENTS, (unet_sd, vae_sd, te_sd)):
        original = tiny[name].state_dict()
        assert converted.keys() == original.keys(), name
        assert all(torch.equal(converted[k], original[k]) for k in original), name


def test_vae_attention_becomes_1x1_conv(tiny_ldm):
    for name in ("q", "k", "v", "proj_out"):
        for side in ("encoder", "decoder"):
            assert tiny_ldm[f"first_stage_model.{side}.mid.attn_1.{name}.weight"].shape == (32, 32, 1, 1)


def test_text_encoder_keys_with_and_without_text_model_level(tiny, tiny_ldm):
    te_sd = tiny["text_encoder"].state_dict()
    flat = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    nested = {"text_model." + k: v for k, v in flat.items()}
    prefix = "cond_stage_model.transformer.text_model."
    for variant in (flat, nested):
        ldm = diffusers_to_ldm(None, None, variant, None, None)
        assert all(k.startswith(prefix) for k in ldm)
        assert ldm.keys() == {k for k in tiny_ldm if k.startswith(prefix)}
    configs = tiny["configs"]
    _, _, kept = ldm_to_diffusers(tiny_ldm, configs["unet"], configs["vae"], te_text_model_level=True)
    _, _, dropped = ldm_to_diffusers(tiny_ldm, configs["unet"], configs["vae"], te_text_model_level=False)
    assert kept.keys() == nested.keys() and dropped.keys() == flat.keys()


def test_unknown_and_missing_keys_are_named(tiny, tiny_ldm):
    configs = tiny["configs"]
    with_stray = dict(tiny_ldm, **{"model.diffusion_model.input_blocks.1.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match=r"input_blocks\.1\.0\.mystery\.weight"):
        ldm_to_diffusers(with_stray, configs["unet"], configs["vae"])

    missing_conv = {k: v for k, v in tiny_ldm.items() if ".input_blocks.1.0.in_layers.2." not in k}
    with pytest.raises(CheckpointKeyError, match=r"missing.*input_blocks\.1\.0\.in_layers\.2"):
        ldm_to_diffusers(missing_conv, configs["unet"], configs["vae"])

    foreign = dict(tiny_ldm, **{"something_else.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="something_else.weight"):
        ldm_to_diffusers(foreign, configs["unet"], configs["vae"])
    ldm_to_diffusers(foreign, configs["unet"], configs["vae"], strict=False)

    unet_sd = dict(tiny["unet"].state_dict(), **{"down_blocks.0.resnets.0.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match=r"down_blocks\.0\.resnets\.0\.extra\.weight"):
        diffusers_to_ldm(unet_sd, None, None, configs["unet"], None)


def test_real_checkpoint_extras_are_ignored(tiny, tiny_ldm):
    extras = {"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.ones(()),
              "model_ema.diffusion_modelinput_blocks00weight": torch.ones(1)}
    unet_sd, _, _ = ldm_to_diffusers(dict(tiny_ldm, **extras), tiny["configs"]["unet"], tiny["configs"]["vae"])
    assert unet_sd.keys() == tiny["unet"].state_dict().keys()


def test_config_mismatch_is_reported(tiny_ldm):
    configs = tiny_sd1_configs()
    configs["unet"]["layers_per_block"] = 1
    with pytest.raises(CheckpointKeyError):
        ldm_to_diffusers(tiny_ldm, configs["unet"], configs["vae"])


# --- module names ----------------------------------------------------------------------------


def test_unet_module_names(tiny):
    config = tiny["configs"]["unet"]
    path = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    assert unet_ldm_module_name(path, config) == "input_blocks.2.1.transformer_blocks.0.attn1.to_q"
    assert unet_ldm_module_name("down_blocks.0.resnets.1.conv1", config) == "input_blocks.2.0.in_layers.2"
    assert unet_ldm_module_name("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.1.conv"
    assert unet_diffusers_module_name("model.diffusion_model.input_blocks.2.1.proj_in", config) == \
        "down_blocks.0.attentions.1.proj_in"
    with pytest.raises(CheckpointKeyError):
        unet_ldm_module_name("down_blocks.7.resnets.0.conv1", config)
    # diffusers' frozen model.config (tuples, extra fields) works as well as the plain dict.
    assert unet_ldm_module_name(path, tiny["unet"].config) == "input_blocks.2.1.transformer_blocks.0.attn1.to_q"


def test_every_unet_parameter_module_maps_both_ways(tiny):
    config = tiny["configs"]["unet"]
    for name, module in tiny["unet"].named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        ldm_name = unet_ldm_module_name(name, config)
        assert unet_diffusers_module_name(ldm_name, config) == name


# --- the real SD1.5 configs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_meta():
    """SD1.5-sized models on the meta device: real names and shapes, no memory, no weights."""
    configs = load_config_dicts()
    with torch.device("meta"):
        models = build_models_from_configs(configs, rerandomise_zeros=False)
    return models, configs


def test_sd15_layout_matches_known_checkpoint_keys(sd15_meta):
    models, configs = sd15_meta
    ldm = _to_ldm(models, configs)
    # SD1.5 single files hold 686 UNet, 248 VAE and 197 text-encoder (incl. position_ids) tensors.
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    assert sum(k.startswith("cond_stage_model.transformer.") for k in ldm) == 197
    expected_shapes = {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    }
    for key, shape in expected_shapes.items():
        assert tuple(ldm[key].shape) == shape, key


def test_sd15_layout_agrees_with_diffusers_converters(sd15_meta):
    """diffusers' own LDM -> diffusers converters must undo our diffusers -> LDM mapping."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    models, configs = sd15_meta
    ldm = _to_ldm(models, configs)
    unet_sd = single_file_utils.convert_ldm_unet_checkpoint(ldm, dict(configs["unet"]))
    vae_sd = single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(configs["vae"]))
    for name, converted in (("unet", unet_sd), ("vae", vae_sd)):
        original = models[name].state_dict()
        assert converted.keys() == original.keys(), name
        assert all(converted[k].shape == original[k].shape for k in original), name


# --- the independent check: diffusers' single-file loader ------------------------------------


def test_diffusers_single_file_loader_reads_our_checkpoint(tiny, single_file):
    from diffusers import StableDiffusionPipeline

    path, config_folder = single_file
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    for name in COMPONENTS:
        _assert_same_state(tiny[name], getattr(pipe, name), name)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_diffusers_unet_from_single_file_with_subfolder(tiny, single_file):
    from diffusers import UNet2DConditionModel

    path, config_folder = single_file
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config_folder), subfolder="unet",
                                                 local_files_only=True)
    _assert_same_state(tiny["unet"], unet, "unet")


def test_single_file_is_written_atomically_and_readable(single_file):
    path, _ = single_file
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    assert os.access(path, os.R_OK) and path.stat().st_mode & 0o044
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "pt"
        assert "model.diffusion_model.input_blocks.0.0.weight" in handle.keys()


def test_config_folder_layout(single_file):
    _, folder = single_file
    expected = {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"}
    found = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert found == expected


def test_diffusers_folder_loads_with_from_pretrained(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = write_diffusers_folder(tmp_path / "pipe", tiny)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for name in COMPONENTS:
        _assert_same_state(tiny[name], getattr(pipe, name), name)
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


def test_packaged_sd1_scheduler_config():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(load_config_dicts()["scheduler"])
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == "epsilon"
    assert torch.isclose(scheduler.betas[0], torch.tensor(0.00085))
    assert torch.isclose(scheduler.betas[-1], torch.tensor(0.012))
    # scaled_linear: linear in sqrt(beta)
    assert torch.isclose(scheduler.betas[500].sqrt(), (0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * 500 / 999)
                         * torch.ones(()), rtol=1e-4)
