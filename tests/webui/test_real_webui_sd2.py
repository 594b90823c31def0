"""Training on a tiny SD2 v-prediction model loaded in the real WebUI (skipped without
LORA_TRAINER_WEBUI_DIR): LDM `LatentDiffusion` with `parameterization: "v"` and the OpenCLIP text
encoder (`FrozenOpenCLIPEmbedder`, tiny arch registered like SDXL's, see test_real_webui_sdxl)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lora_trainer.lora.kohya_file import read_lora_file

from test_real_webui_sdxl import (PROMPT, attention_effect, headless_layers, lora_tensors, model_state,
                                  probe_against_headless, serve_tiny_model, train, txt2img)
from webui_harness import SKIP_REASON, WEBUI_DIR, http

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

CHECKPOINT = "tiny-sd2-v"


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    if not WEBUI_DIR:
        pytest.skip(SKIP_REASON)
    from tiny_sdxl_model import write_tiny_sd2_v_model

    yield from serve_tiny_model(tmp_path_factory, write_tiny_sd2_v_model, CHECKPOINT)


def test_train_sd2_v_on_the_loaded_model_and_use_the_lora(sd2, tmp_path):
    assert CHECKPOINT in http("GET", sd2["url"] + "/sdapi/v1/options")["sd_model_checkpoint"]
    base = txt2img(sd2, PROMPT)
    before = model_state(sd2)
    name = "sd2v_lora"
    result = train(sd2, output_name=name, target_modules="locon", train_text_encoder=True)
    assert result["status"] == "finished" and result["step"] == 10, result
    run_log = (Path(result["run_dir"]) / "logs" / "train.log").read_text()
    assert model_state(sd2) == before

    lora = Path(result["lora_path"])
    tensors = lora_tensors(lora)
    layers = sorted({k.partition(".")[0] for k in tensors})
    te = [k for k in layers if k.startswith("lora_te_")]
    matched = http("GET", sd2["url"] + f"/lora_trainer_test/matched/{name}")
    print(f"SD2-v file: {len(layers)} layers (te {len(te)}); {matched}")
    assert matched["sd_version"] == "SdVersion.SD2", matched
    assert matched["file_layers"] == len(layers) and matched["matched"] == len(layers), matched
    assert te and matched["text_encoder_layers"] == len(te)
    # every layer trained: no layer of the resblock SD2 never runs (it takes the penultimate one)
    untrained = [k for k in layers if not tensors[f"{k}.lora_up.weight"].abs().max() > 0]
    assert untrained == [], untrained
    # OpenCLIP's attention (nn.MultiheadAttention) as q/k/v/out projections + the MLP, for the two
    # resblocks SD2 runs; the same layers as the headless (CLI) trainer's file for this checkpoint
    assert te == sorted(f"lora_te_text_model_encoder_layers_{i}_{part}" for i in (0, 1)
                        for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                     "self_attn_out_proj", "mlp_fc1", "mlp_fc2"))
    cli = headless_layers(sd2, CHECKPOINT, "sd2-v", tmp_path, target_modules="locon", train_text_encoder=True)
    assert layers == cli, sorted(set(layers) ^ set(cli))
    # trained as what it is: a v-prediction SD2 model
    metadata = read_lora_file(lora)[1]
    assert metadata["ss_prediction_type"] == "v_prediction" and metadata["ss_v2"] == "True", metadata
    assert "prediction_type=v_prediction" in run_log

    with_lora = txt2img(sd2, f"{PROMPT} <lora:{name}:0.7>")
    print(f"<lora:{name}:0.7> vs base: max {np.abs(with_lora - base).max()}, "
          f"mean {np.abs(with_lora - base).mean():.2f} (0-255)")
    assert np.abs(with_lora - base).max() > 0, "the LoRA does not change the image"
    assert np.array_equal(txt2img(sd2, f"{PROMPT} <lora:{name}:0>"), base)
    assert model_state(sd2)["digest"] == before["digest"]


def test_sd2_v_training_inputs_are_the_headless_trainers(sd2, tmp_path):
    report = probe_against_headless(sd2, CHECKPOINT, "sd2-v", tmp_path)
    print(f"SD2-v WebUI vs headless (max diff, scale): {report}")
    assert report["webui"] == {"prediction_type": "v_prediction", "family": "sd2"}
    assert report["headless_prediction_type"] == "v_prediction"
    for name in ("crossattn", "latent", "alphas_cumprod", "prediction"):
        diff, scale = report[name]
        assert diff <= 1e-5 * max(1.0, scale), (name, report)


def test_sd2_openclip_attention_lora_in_training_is_what_the_webui_applies(sd2, tmp_path):
    """The OpenCLIP attention LoRA (random, large) changes the caption conditioning during training
    exactly as the WebUI's Lora extension does when it applies the same file, and as the headless
    trainer trains it."""
    report = attention_effect(sd2, "lora_te_", CHECKPOINT, "sd2-v", tmp_path)
    print(f"SD2 attention LoRA: {report}")
    assert report["layers"] == 4 * 2      # q/k/v/out of the 2 resblocks SD2 runs
    assert report["train_vs_base"] > 1e-2 * max(1.0, report["scale"]), report
    assert report["train_vs_webui"] <= 1e-5 * max(1.0, report["scale"]), report
    assert report["train_vs_headless"] <= 1e-5 * max(1.0, report["scale"]), report
    assert report["weights_as_before"] and model_state(sd2)["adapter_hosts"] == 0
