"""End-to-end headless training on a tiny SD1 model: the file it writes, what loads it, and that
training actually learns."""
from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.backbones.diffusers_sd import load_backbone
from lora_trainer.cli import main as cli_main
from lora_trainer.config import load_config
from lora_trainer.lora.kohya_file import network_from_tensors, read_lora_file
from lora_trainer.app.session import train_from_config


def train(config_path, **overrides):
    return train_from_config(load_config(config_path, overrides))


def fixed_inputs(backbone, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])[:batch]
    return latents, t


@pytest.mark.parametrize("adapter", [{}, {"adapter_type": "locon", "conv_rank": 2}], ids=["lora", "locon"])
def test_exported_lora_loads_in_diffusers_and_reproduces_the_trained_model(make_config, tiny_sd1, adapter):
    """diffusers is the second, independent consumer for LoRA and LoCon. It has none for LoHa/LoKr
    files with kohya names, and it maps a DoRA file's `dora_scale` onto peft's per-OUTPUT magnitude
    vector, while the WebUI and LyCORIS read it per INPUT channel (checked: its render differs), so
    DoRA's reference is the WebUI (tests/kohya_reference.py and the real-WebUI suite)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    cfg_path = make_config(train_text_encoder=True, learning_rate=2e-2, epochs=1, **adapter)
    result = train(cfg_path)
    tensors, meta = read_lora_file(result.lora_path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in tensors)

    # ours: the base model + the file's LoRA attached at weight 1
    ours = load_backbone(str(tiny_sd1["single_file"]))
    network, unmatched = network_from_tensors(ours.lora_targets(), tensors)
    assert unmatched == []
    network.attach()
    # diffusers: its own loader on a pipeline built from the same weights
    ref = load_backbone(str(tiny_sd1["single_file"]))
    pipe = StableDiffusionPipeline(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer,
                                   unet=ref.unet, scheduler=DDPMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    base_cond = ref.encode_text(["lt_demo, a red circle"])["crossattn"]
    pipe.load_lora_weights(str(result.lora_path), adapter_name="trained")
    # every layer of our file became a LoRA layer in diffusers: nothing was silently dropped
    lora_layers = [n for n, m in list(pipe.unet.named_modules()) + list(pipe.text_encoder.named_modules())
                   if hasattr(m, "lora_A") and "trained" in getattr(m, "lora_A", {})]
    assert len(lora_layers) == len(network.adapters)

    with torch.no_grad():
        cond_ours = ours.encode_text(["lt_demo, a red circle"])["crossattn"]
        cond_ref = ref.encode_text(["lt_demo, a red circle"])["crossattn"]
        assert (cond_ours - cond_ref).abs().max() <= 1e-5
        assert (cond_ref - base_cond).abs().max() > 1e-3   # the text-encoder LoRA did something
        latents, t = fixed_inputs(ours)
        out_ours = ours.predict(latents, t, {"crossattn": cond_ours.expand(2, -1, -1)})
        out_ref = ref.predict(latents, t, {"crossattn": cond_ref.expand(2, -1, -1)})
        network.detach()
        out_base = ours.predict(latents, t, {"crossattn": base_cond.expand(2, -1, -1)})
    assert (out_ours - out_ref).abs().max() <= 1e-5
    assert (out_ours - out_base).abs().max() > 1e-3


def test_metadata_is_what_the_webui_reads(make_config):
    result = train(make_config(trigger_word="lt_demo", epochs=1))
    _, meta = read_lora_file(result.lora_path)
    assert meta["ss_output_name"] == "test_lora"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_num_train_images"] == "12"        # 6 images x 2 repeats (the 2_shapes folder)
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["2_shapes"]["lt_demo"] == 6
    assert meta["ss_steps"] == "6" and len(meta["sshs_model_hash"]) == 64
    assert json.loads(meta["lora_trainer_config"])["lora_rank"] == 4


def eval_loss(backbone, network, index, seed=123):
    """Loss on fixed noise and timesteps over the training images (lower = learned them)."""
    from lora_trainer.data.images import load_rgb, resize_and_crop, to_tensor

    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for rec in index.records:
            img, _, _ = resize_and_crop(load_rgb(rec.path), 64, 64)
            latents = backbone.encode_image(to_tensor(img)[None], torch.Generator().manual_seed(0))
            cond = backbone.encode_text([rec.caption])
            for t in (200, 500, 800):
                noise = torch.randn(latents.shape, generator=g)
                a = backbone.alphas_cumprod[t]
                noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
                pred = backbone.predict(noisy, torch.tensor([t]), cond)
                total += float((pred - noise).pow(2).mean())
    return total


def test_tiny_overfit_lowers_the_loss_clearly(make_config, tiny_sd1):
    from lora_trainer.data.discovery import discover

    cfg_path = make_config(learning_rate=1e-2, epochs=8, lora_rank=8)
    cfg = load_config(cfg_path)
    backbone = load_backbone(str(tiny_sd1["single_file"]))
    index = discover(cfg.train_data_dir)
    before = eval_loss(backbone, None, index)
    result = train(cfg_path)
    tensors, _ = read_lora_file(result.lora_path)
    network, _ = network_from_tensors(backbone.lora_targets(), tensors)
    network.attach()
    after = eval_loss(backbone, network, index)
    assert after < 0.8 * before, (before, after)


def test_single_file_and_diffusers_folder_train_identically(make_config, tiny_sd1):
    a = train(make_config("single", epochs=1))
    b = train(make_config("folder", epochs=1, base_model=tiny_sd1["folder"]))
    ta, _ = read_lora_file(a.lora_path)
    tb, _ = read_lora_file(b.lora_path)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_seed_yaml_runs_with_only_paths_changed(tmp_path, tiny_sd1):
    from PIL import Image

    data = tmp_path / "data" / "style_train"
    data.mkdir(parents=True)
    rows = ["file_name,text"]
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (96, 128), colour).save(data / f"{i}.png")
        rows.append(f'{i}.png,"ink wash, {colour} painting"')
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    seed_yaml = f"""\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "{tiny_sd1['folder']}"
lora_rank: 8
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""
    (tmp_path / "seed.yaml").write_text(seed_yaml)
    result = train(tmp_path / "seed.yaml", resolution=64)  # 512 px also works; 64 keeps CI fast
    assert result.status == "finished" and result.step == 10
    assert result.lora_path == tmp_path / "output" / "my_style_lora" / "my_lora.safetensors"
    assert result.lora_path.exists()
    assert (tmp_path / "runs" / "my_lora" / "config.yaml").exists()
    assert (tmp_path / "runs" / "my_lora" / "logs" / "train.log").exists()


def test_cli_names_every_mistake_at_once(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learnig_rate: 1e-4\nlora_rank: 0\noptimizer: adam\nbase_model: ./nope.safetensors\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    for needle in ("learnig_rate", "did you mean 'learning_rate'", "lora_rank", "optimizer", "adamw",
                   "nope.safetensors", "train_data_dir"):
        assert needle in err, needle


def test_init_lora_from_continues_a_finished_lora(make_config):
    first = train(make_config("first", epochs=1, learning_rate=2e-2))
    t1, _ = read_lora_file(first.lora_path)
    second = train(make_config("second", epochs=1, init_lora_from=first.lora_path, learning_rate=0.0,
                               output_name="second"))
    t2, _ = read_lora_file(second.lora_path)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)   # lr 0: the loaded weights come out unchanged
    with pytest.raises(Exception, match="lora_rank"):
        train(make_config("third", epochs=1, init_lora_from=first.lora_path, lora_rank=8))
