"""The WebUI started with --medvram (real WebUI; skipped without LORA_TRAINER_WEBUI_DIR): the
WebUI's hooks move the text encoder, the VAE and the UNet on and off the device around every call.
On this CPU-only machine the moves are to the CPU itself, so what is checked is that training
works through those hooks (text encoder trained too, so both are swapped within a step), hands
the model back unchanged and gives a LoRA the WebUI applies; the GPU side of --medvram
(`WebuiBackbone.device` = the WebUI's device, not where a parked weight lies) is unit-tested in
tests/test_webui_backbone.py. --lowvram is refused with a message that names the fix."""
from __future__ import annotations

import json
import time

import pytest

from webui_harness import SKIP_REASON, WEBUI_DIR, http

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def medvram(tmp_path_factory):
    from conftest import prepare_webui_data, start_webui, stop_webui

    prepared = prepare_webui_data(tmp_path_factory.mktemp("webui-medvram"))
    server = start_webui(prepared["root"], prepared["python"], prepared["data"],
                         prepared["data"] / "webui.log", prepared["env"], extra_args=("--medvram",))
    try:
        yield {**prepared, "url": server["url"], "server": server}
    finally:
        stop_webui(server)


def test_training_works_through_the_medvram_hooks(medvram):
    url = medvram["url"]
    assert http("GET", url + "/sdapi/v1/cmd-flags")["medvram"] is True
    before = http("GET", url + "/lora_trainer_test/model_state")
    result = http("POST", url + "/lora_trainer_test/train", {
        "train_data_dir": str(medvram["dataset"]), "output_name": "medvram_lora", "resolution": 64,
        "lora_rank": 4, "batch_size": 2, "learning_rate": 2e-2, "max_train_steps": 4, "save_steps": 0,
        "resume": False, "preview_prompts": [], "write_card": False, "train_text_encoder": True})
    assert result["status"] == "finished" and result["step"] == 4, result
    assert http("GET", url + "/lora_trainer_test/model_state") == before
    matched = http("GET", url + "/lora_trainer_test/matched/medvram_lora")
    assert matched["matched"] == matched["file_layers"] > 0 and matched["text_encoder_layers"] > 0


def test_lowvram_is_refused_with_the_fix(tmp_path):
    """A second server with --lowvram: the job is refused before anything is touched."""
    from conftest import prepare_webui_data, start_webui, stop_webui

    prepared = prepare_webui_data(tmp_path / "data")
    server = start_webui(prepared["root"], prepared["python"], prepared["data"], tmp_path / "webui.log",
                         prepared["env"], extra_args=("--lowvram",))
    try:
        config = {"train_data_dir": str(prepared["dataset"]), "output_name": "lowvram_lora",
                  "resolution": 64, "max_train_steps": 2, "resume": False, "preview_prompts": []}
        data = http("POST", server["url"] + "/run/lora_trainer_train_json",
                    {"data": [f"task(lowvram-{time.time()})", json.dumps(config)]})["data"]
        assert data[0] in ("", None), data
        assert "--lowvram" in data[-1] and "--medvram works" in data[-1], data
        assert not (prepared["extension"] / "runs" / "lowvram_lora").exists()
    finally:
        stop_webui(server)
