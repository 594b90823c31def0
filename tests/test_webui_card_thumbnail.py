"""The Lora card thumbnail of a WebUI run without preview prompts (lora_trainer.preview.card_thumbnail),
against the stand-in model and the stand-in of `modules.processing` (tests/webui_standin.py); the
same in the real WebUI: tests/webui/test_real_webui_browser.py."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.webui import job
from lora_trainer.preview.card_thumbnail import CardThumbnail

sys.path.insert(0, str(Path(__file__).parent))
from webui_standin import StandInSD1, txt2img_env  # noqa: E402


@pytest.fixture
def env(tiny_sd1, tmp_path):
    return txt2img_env(StandInSD1(tiny_sd1["single_file"]), tmp_path / "models" / "Lora")


def cfg_for(make_config, tmp_path, env, name, **values):
    values = dict(dict(max_train_steps=3, epochs=1, learning_rate=5e-2, cache_latents_to_disk=False,
                       resume=False, output_name=name, preview_prompts=[], preview_steps=2,
                       output_dir=env.cmd_opts.lora_dir, run_dir=str(tmp_path / "runs" / name)), **values)
    return load_config(make_config(name, **values))


def test_no_preview_prompts_one_render_at_the_end_for_the_card(make_config, tmp_path, env):
    cfg = cfg_for(make_config, tmp_path, env, "plain", trigger_word="lt_demo", preview_every_n_steps=1)
    assert isinstance(job.webui_previewer(cfg, env), CardThumbnail)
    env.processing.seen.clear()
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished"
    # nothing before the first step or at preview_every_n_steps: one render, of the trained LoRA
    assert [seen["prompt"] for seen in env.processing.seen] == ["lt_demo, <lora:plain:0.7>"]
    card = Path(result.lora_path).with_suffix(".preview.png")
    final = Path(cfg.run_dir) / "previews" / "000003" / "0.png"
    assert sorted(p.name for p in (Path(cfg.run_dir) / "previews").iterdir()) == ["000003"]
    assert np.array_equal(np.asarray(Image.open(card).convert("RGB")), np.asarray(Image.open(final).convert("RGB")))


def test_write_card_off_means_no_render(make_config, tmp_path, env):
    cfg = cfg_for(make_config, tmp_path, env, "nocard", write_card=False)
    assert job.webui_previewer(cfg, env) is None
    env.processing.seen.clear()
    result = job.train_on_loaded_model(cfg, env=env)
    assert result.status == "finished" and env.processing.seen == []
    assert not Path(result.lora_path).with_suffix(".preview.png").exists()
