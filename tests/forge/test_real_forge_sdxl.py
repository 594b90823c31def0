"""SDXL in a real Forge (CPU, offline): the tab's JSON endpoint trains the SDXL model Forge has
loaded (UNet and both text encoders), hands it back bit-identical, Forge's own Lora loader takes
every key of the file, and `<lora:name:0.7>` in Forge's txt2img gives exactly the preview's pixels.

Skipped unless LORA_TRAINER_FORGE_DIR is set (forge_harness) and LORA_TRAINER_FORGE_SDXL_CHECKPOINT
names an SDXL-architecture single-file checkpoint (Forge builds SDXL from its own configs, so it must
have the real shapes: e.g. the random-weight one `benchmarks/bench_realsize.py` writes, 6.9 GB
fp16). Forge runs with --unet-in-bf16 so the model fits a 24 GB machine (the UNet in bf16, about
5 GB, Forge computing in fp32 on the CPU); one Forge server of its own, 11-12 GB RSS while training
(gradient checkpointing, which the job switches on for 16-bit storage computed in fp32), more while
Forge renders with the LoRA merged (it keeps a copy of every weight it patches): up to 15 GB."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from forge_harness import FORGE_DIR, SKIP_REASON, prepare_forge_data, start_forge, stop_forge
from test_real_forge import config, last_preview, state, tab_api
from webui_harness import txt2img

from lora_trainer.lora.kohya_file import read_lora_file

SDXL_CHECKPOINT = os.environ.get("LORA_TRAINER_FORGE_SDXL_CHECKPOINT")
pytestmark = [pytest.mark.skipif(not FORGE_DIR, reason=SKIP_REASON),
              pytest.mark.skipif(not SDXL_CHECKPOINT, reason="real-Forge SDXL: set LORA_TRAINER_FORGE_SDXL_CHECKPOINT "
                                 "to an SDXL-architecture .safetensors (docs/forge.md)")]


@pytest.fixture(scope="module")
def forge_xl(tmp_path_factory):
    prepared = prepare_forge_data(tmp_path_factory.mktemp("forge-xl-data"), Path(SDXL_CHECKPOINT).resolve(),
                                  name="random-sdxl.safetensors")
    server = start_forge(prepared, tmp_path_factory.mktemp("forge-xl-log") / "forge.log",
                         extra_args=("--unet-in-bf16",))
    try:
        yield dict(prepared, url=server["url"], server=server)
    finally:
        stop_forge(server)


def test_sdxl_trains_on_the_loaded_forge_model(forge_xl):
    url, name = forge_xl["url"], "forge_xl"
    without_lora = txt2img(url, "lt_demo", steps=2)       # loads the model; CLIP settles
    before = state(url)
    assert before["unet_storage"] == "torch.bfloat16" and before["inference_tensors"], before

    # attention layers only: a generation with the LoRA makes Forge back up every weight it patches
    # (here about 2 GB instead of 5 with kohya's default attn-mlp), on top of the 11 GB of the model
    cfg = config(forge_xl, name, train_text_encoder=True, target_modules="attn",
                 preview_prompts=["lt_demo, <lora:{name}:0.7>"])
    data = tab_api(url, cfg)
    result = json.loads(data[0]) if data[0] else data
    assert result["status"] == "finished" and result["step"] == 2, result
    after = state(url)
    assert after["digest"] == before["digest"] and after["model_id"] == before["model_id"]
    assert after["inference_tensors"] and after["adapter_hosts"] == 0 and after["lora_backups"] == 0

    tensors, _ = read_lora_file(result["lora_path"])
    layers = {k.split(".")[0] for k in tensors}
    te_layers = {k for k in layers if k.startswith(("lora_te1_", "lora_te2_"))}
    assert any(k.startswith("lora_unet_input_blocks_") for k in layers)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in te_layers)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in te_layers)

    with_lora = txt2img(url, f"lt_demo, <lora:{name}:0.7>", steps=2)
    assert np.array_equal(with_lora, last_preview(result))
    assert not np.array_equal(with_lora, without_lora)
    # Forge's own loader took every key: the UNet's and both text encoders'
    log = forge_xl["server"]["log_path"].read_text()
    loaded = re.findall(rf"Loaded \S*{name}\.safetensors for \S+-(UNet|CLIP) with (\d+) keys .*\(skipped (\d+) keys\)",
                        log)
    assert ("CLIP", str(len(te_layers)), "0") in loaded, loaded
    assert ("UNet", str(len(layers - te_layers)), "0") in loaded, loaded
    assert f"{name}.safetensors for" in log and "unmatched keys" not in log
