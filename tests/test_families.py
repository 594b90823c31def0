"""SD2 and SDXL end to end on tiny single-file checkpoints built from configs: training on a mixed
3:4 / 16:9 dataset, the file diffusers loads back, and the metadata that marks the family."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from lora_trainer.backbones import tiny
from lora_trainer.backbones.diffusers_sd import load_backbone
from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import network_from_tensors, read_lora_file
from lora_trainer.app.session import train_from_config


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for i in range(3):
        for name, size in (("portrait", (96, 128)), ("wide", (224, 126))):
            img = Image.new("RGB", size, (60 * i, 120, 200))
            ImageDraw.Draw(img).rectangle((8, 8, size[0] // 2, size[1] // 2), fill=(240, 40, 40))
            img.save(folder / f"{name}_{i}.png")
            (folder / f"{name}_{i}.txt").write_text(f"{name} picture, red square, tone {i}")
    return folder


def write_tiny(family, folder):
    components = tiny.build_tiny(family, seed=0)
    path = folder / f"tiny-{family}.safetensors"
    tiny.write_config_folder(folder / f"tiny-{family}.config", components["configs"])
    tiny.write_single_file(path, components)
    return path


def pipeline_for(family, backbone):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=backbone.vae, text_encoder=backbone.text_encoders[0],
                                         text_encoder_2=backbone.text_encoders[1],
                                         tokenizer=backbone.tokenizers[0], tokenizer_2=backbone.tokenizers[1],
                                         unet=backbone.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder,
                                   tokenizer=backbone.tokenizer, unet=backbone.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("family,version,arch", [
    ("sd2", "sd_v2", "stable-diffusion-v2-512/lora"),     # the tiny SD2 config is epsilon
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_family_trains_on_mixed_aspects_and_diffusers_reproduces_it(family, version, arch, tmp_path,
                                                                     mixed_dataset, make_config):
    checkpoint = write_tiny(family, tmp_path)
    cfg = make_config(family, base_model=checkpoint, train_data_dir=mixed_dataset, resolution=128,
                      train_text_encoder=True, learning_rate=2e-2, epochs=1)
    result = train_from_config(load_config(cfg))
    tensors, meta = read_lora_file(result.lora_path)
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert len(json.loads(meta["ss_bucket_info"])["buckets"]) == 2
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
        assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)

    ours = load_backbone(str(checkpoint))
    network, unmatched = network_from_tensors(ours.lora_targets(), tensors)
    assert unmatched == []
    network.attach()
    ref = load_backbone(str(checkpoint))
    pipe = pipeline_for(family, ref)
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    modules = [m for enc in (ref.unet, *ref.text_encoders) for m in enc.modules()]
    assert sum(1 for m in modules if "trained" in getattr(m, "lora_A", {})) == len(network.adapters)

    sizes = [{"original": (128, 96), "crop": (0, 0), "target": (128, 96)}] * 2
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([50, 900])
    with torch.no_grad():
        cond_ours = ours.encode_text(["portrait picture", "wide picture"], sizes)
        cond_ref = ref.encode_text(["portrait picture", "wide picture"], sizes)
        for k in cond_ours:
            assert (cond_ours[k] - cond_ref[k]).abs().max() <= 1e-5, k
        out_ours = ours.predict(latents, t, cond_ours)
        out_ref = ref.predict(latents, t, cond_ref)
        network.detach()
        out_base = ours.predict(latents, t, ours.encode_text(["portrait picture", "wide picture"], sizes))
    assert (out_ours - out_ref).abs().max() <= 1e-5
    assert (out_ours - out_base).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_demo_builds_and_trains_each_family(family, tmp_path):
    from lora_trainer.cli import main

    assert main(["demo", "--workdir", str(tmp_path / family), "--family", family, "--quiet"]) == 0
    assert (tmp_path / family / "models" / "Lora" / f"demo_{family}.safetensors").exists()



def test_the_family_table_is_the_one_list_of_families():
    """The demo's --family choices and the WebUI's name layouts come from diffusion.families: a row
    added there is offered by the demo and needs only its places in the WebUI's model."""
    from lora_trainer.cli import build_parser
    from lora_trainer.diffusion.families import FAMILIES
    from lora_trainer.webui import names

    parser = build_parser()
    for family in FAMILIES:
        assert parser.parse_args(["demo", "--family", family]).family == family
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--family", "sd3"])
    assert set(names.LAYOUTS) == set(FAMILIES)
