"""Previews inside the WebUI through its own txt2img (lora_trainer.webui.preview.WebuiPreviewer),
against the stand-in model and a stand-in of `modules.processing` whose process_images applies
`<lora:…>` from the saved files the way the Lora extension does (tests/webui_standin.py). The same
against the real WebUI: tests/webui/test_real_webui.py."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.lora import host
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.webui import job
from lora_trainer.webui.preview import WebuiPreviewer, webui_sampler_name

sys.path.insert(0, str(Path(__file__).parent))
from webui_standin import StandInSD1, txt2img_env  # noqa: E402

PROMPTS = ["lt_demo, a red circle", "lt_demo, a red circle <lora:{name}:1>"]


@pytest.fixture
def standin(tiny_sd1):
    return StandInSD1(tiny_sd1["single_file"])


@pytest.fixture
def env(standin, tmp_path):
    return txt2img_env(standin, tmp_path / "models" / "Lora")


def cfg_for(make_config, tmp_path, env, name, **values):
    values = dict(dict(max_train_steps=2, epochs=1, learning_rate=5e-2, cache_latents_to_disk=False,
                       resume=False, write_card=False, output_name=name,
                       output_dir=env.cmd_opts.lora_dir, run_dir=str(tmp_path / "runs" / name)), **values)
    return load_config(make_config(name, **values))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sampler_names_map_to_the_webuis():
    assert [webui_sampler_name(s) for s in ("euler", "euler_a", "ddim")] == ["Euler", "Euler a", "DDIM"]
    with pytest.raises(ValueError, match="unknown preview sampler"):
        webui_sampler_name("dpm_9000")


def test_previews_go_through_process_images_and_do_not_change_training(make_config, tmp_path, env, standin):
    clean = {k: v.detach().clone() for k, v in standin.state_dict().items()}
    cfg = cfg_for(make_config, tmp_path, env, "with_previews", preview_every_n_steps=1, preview_steps=3,
                  preview_seed=5, preview_sampler="euler_a", preview_cfg_scale=4.0,
                  preview_prompts=PROMPTS, write_card=True)
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished" and result.step == 2

    seen = env.processing.seen
    # before the first step, after step 1, and at the end of training: two prompts each
    assert len(seen) == 6
    assert seen[3]["prompt"] == "lt_demo, a red circle <lora:with_previews:1>"
    args = seen[3]["args"]
    assert (args["steps"], args["seed"], args["sampler_name"], args["cfg_scale"]) == (3, 5, "Euler a", 4.0)
    assert (args["width"], args["height"]) == (cfg.resolution, cfg.resolution)
    assert args["do_not_save_samples"] and args["do_not_save_grid"] and seen[3]["p"].closed
    # while previewing: no training adapters in the forward path, no grad, eval mode
    assert all(s["adapters"] == 0 and not s["grad"] and not s["training"] for s in seen)

    folder = Path(cfg.run_dir) / "previews"
    for step in ("000001", "000002"):
        assert {p.name for p in (folder / step).iterdir()} == {"0.png", "1.png", "grid.png"}
    base, with_lora = pixels(folder / "000002" / "0.png"), pixels(folder / "000002" / "1.png")
    assert np.abs(with_lora - base).max() > 0, "the LoRA does not change the preview"
    # the saved file is what the preview used: a later step's LoRA renders differently
    assert not np.array_equal(pixels(folder / "000001" / "1.png"), with_lora)
    assert np.array_equal(pixels(folder / "000001" / "0.png"), base)     # same seed, no LoRA
    assert "lt_demo, a red circle <lora:with_previews:1>" in Image.open(folder / "000002" / "1.png").info["parameters"]
    assert (Path(cfg.output_dir) / "with_previews.preview.png").exists()

    # the WebUI's model is clean afterwards: merges undone, nothing attached
    assert env.networks.loaded_networks == []
    after = standin.state_dict()
    assert [k for k in clean if not torch.equal(clean[k], after[k])] == []
    assert not any(host.has_adapters(m) for m in standin.modules())
    assert all(getattr(m, "network_current_names", ()) == () for m in standin.network_layer_mapping.values())

    # the same run without previews trains the same LoRA, bit for bit
    plain = job.train_on_loaded_model(cfg_for(make_config, tmp_path, env, "without_previews",
                                              preview_prompts=[]), env=env)
    a, b = read_lora_file(result.lora_path)[0], read_lora_file(plain.lora_path)[0]
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_untrained_lora_is_left_out_of_the_first_preview(make_config, tmp_path, env):
    """Before the first step the LoRA is all zeros: the preview drops its tags (exactly the same
    image) and writes no file, so a LoRA of that name from an earlier run, and its card, stay as
    they are until the new run's first real save."""
    earlier = job.train_on_loaded_model(cfg_for(make_config, tmp_path, env, "again", write_card=True,
                                                preview_every_n_steps=2, preview_prompts=PROMPTS), env=env)
    lora, card = Path(earlier.lora_path), Path(earlier.lora_path).with_suffix(".preview.png")
    old_lora, old_card = lora.read_bytes(), card.read_bytes()
    untouched, render = [], env.processing.process_images

    def watching(p):
        untouched.append(lora.read_bytes() == old_lora and card.read_bytes() == old_card)
        return render(p)
    env.processing.process_images = watching
    env.processing.seen.clear()
    # another run folder: replacing the earlier run's LoRA must be asked for (overwrite_output)
    cfg = cfg_for(make_config, tmp_path, env, "again", write_card=True, seed=99, preview_every_n_steps=2,
                  preview_prompts=PROMPTS, run_dir=str(tmp_path / "runs" / "again-2"), overwrite_output=True)
    assert job.train_on_loaded_model(cfg, env=env).status == "finished"
    assert untouched == [True, True, False, False]            # step 0 (2 prompts), then step 2
    prompts = [seen["prompt"] for seen in env.processing.seen]
    assert prompts == [PROMPTS[0], PROMPTS[0], PROMPTS[0], "lt_demo, a red circle <lora:again:1>"]
    first = Path(cfg.run_dir) / "previews" / "000000"
    assert np.array_equal(pixels(first / "0.png"), pixels(first / "1.png"))
    assert lora.read_bytes() != old_lora and card.read_bytes() != old_card
    kept = sorted((Path(cfg.run_dir) / "replaced").glob("again.bak-*.safetensors"))
    assert [path.read_bytes() for path in kept] == [old_lora]


def test_previewer_restores_everything_when_rendering_fails(make_config, tmp_path, env, standin, capsys):
    def boom(p):
        env.networks.merge_file(Path(env.cmd_opts.lora_dir) / "broken.safetensors", 1.0)
    cfg = cfg_for(make_config, tmp_path, env, "broken", preview_every_n_steps=1, preview_prompts=PROMPTS)
    env.processing.process_images = boom      # the file is not there: raises mid-preview
    clean = {k: v.detach().clone() for k, v in standin.state_dict().items()}
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"                    # a preview failure costs its images only
    said = capsys.readouterr().out                        # the job logs to the WebUI's console
    assert "Previews at step 0 failed (LoraFileError" in said and "training goes on" in said
    plain = job.train_on_loaded_model(cfg_for(make_config, tmp_path, env, "unbroken"), env=env)
    a, b = read_lora_file(result.lora_path)[0], read_lora_file(plain.lora_path)[0]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []   # and changes nothing in training
    after = standin.state_dict()
    assert [k for k in clean if not torch.equal(clean[k], after[k])] == []
    assert not any(host.has_adapters(m) for m in standin.modules())
    assert not job.is_training()


def test_webui_previewer_is_used_only_with_prompts_and_process_images(make_config, tmp_path, env):
    cfg = cfg_for(make_config, tmp_path, env, "choice", preview_prompts=PROMPTS)
    assert isinstance(job.webui_previewer(cfg, env), WebuiPreviewer)
    assert job.webui_previewer(cfg_for(make_config, tmp_path, env, "none", preview_prompts=[]), env) is None
    env.processing = types.SimpleNamespace()
    assert job.webui_previewer(cfg, env) is None


def test_warns_when_the_lora_is_saved_where_the_lora_extension_does_not_look(make_config, tmp_path, env, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        WebuiPreviewer(cfg_for(make_config, tmp_path, env, "elsewhere", preview_prompts=PROMPTS,
                               output_dir=str(tmp_path / "elsewhere")), env)
    assert "outside the WebUI's Lora folder" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        WebuiPreviewer(cfg_for(make_config, tmp_path, env, "inside", preview_prompts=PROMPTS), env)
    assert "outside the WebUI's Lora folder" not in caplog.text
