"""The Forge host in a real Stable Diffusion WebUI Forge (CPU, offline; skipped without
LORA_TRAINER_FORGE_DIR, see forge_harness): the tab's JSON endpoint on Forge's gradio 4 trains the model
Forge has loaded and leaves it bit-identical (inference tensors, no LoRA patch left); the file is on
the Lora cards; `<lora:name:0.7>` in Forge's txt2img gives exactly the in-training preview's
pixels, stacked with another LoRA too; kill -9 of Forge mid-run, a restart, and Resume finishes."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from forge_harness import FORGE_DIR, SKIP_REASON, forge_data, start_forge, stop_forge  # noqa: F401 (fixture)
from webui_harness import http, pixels, txt2img

pytestmark = pytest.mark.skipif(not FORGE_DIR, reason=SKIP_REASON)

# previews rendered exactly as txt2img() below renders (2 Euler steps at 64 px: Forge on 2 CPU cores)
PREVIEWS = dict(preview_steps=2, preview_width=64, preview_height=64, preview_seed=1, preview_sampler="euler",
                preview_cfg_scale=7, preview_negative_prompt="")


def config(forge_data, name, **values):
    return {"train_data_dir": str(forge_data["dataset"]), "output_name": name, "resolution": 64, "lora_rank": 4,
            "batch_size": 1, "learning_rate": 5e-2, "max_train_steps": 2, "save_steps": 0,
            "save_precision": "fp32", "resume": False, "write_card": False, **PREVIEWS, **values}


def tab_api(url: str, cfg: dict) -> list:
    """The tab's hidden endpoint, as a script calls it (blocks until the run ends)."""
    return http("POST", url + "/run/lora_trainer_train_json",
                {"data": [f"task({cfg['output_name']}-{time.time()})", json.dumps(cfg)]})["data"]


def state(url: str) -> dict:
    return http("GET", url + "/lora_trainer_forge_test/model_state")


def last_preview(result: dict) -> np.ndarray:
    return pixels(Path(result["run_dir"]) / "previews" / f"{result['step']:06d}" / "0.png")


def test_train_on_the_loaded_forge_model(forge_data, tmp_path):
    server = start_forge(forge_data, tmp_path / "forge.log")
    url = server["url"]
    try:
        # the Train LoRA tab was built on Forge's gradio 4 (not the placeholder that says why not)
        page = json.dumps(http("GET", url + "/config"))
        assert '"lora_trainer_progress"' in page and '"lora_trainer_train_json"' in page
        assert "Train LoRA is not available" not in page

        # a generation first: Forge converts CLIP's embeddings to fp32 at its first text encoding, so
        # the model's digest is only stable from then on (the job itself settles it the same way)
        without_lora = txt2img(url, "lt_demo", steps=2)
        before = state(url)
        assert before["inference_tensors"] and before["lora_backups"] == 0

        data = tab_api(url, config(forge_data, "forge_a", preview_prompts=["lt_demo, <lora:{name}:0.7>"]))
        result = json.loads(data[0])
        assert result["status"] == "finished" and result["step"] == 2, data
        after = state(url)
        assert after["digest"] == before["digest"] and after["model_id"] == before["model_id"]
        assert after["inference_tensors"] and after["adapter_hosts"] == 0
        assert after["instance_forwards"] == before["instance_forwards"] and after["lora_backups"] == 0

        lora_dir = forge_data["data"] / "models" / "Lora"
        assert Path(result["lora_path"]) == lora_dir / "forge_a.safetensors"
        assert "forge_a" in [entry["name"] for entry in http("GET", url + "/sdapi/v1/loras")]

        with_lora = txt2img(url, "lt_demo, <lora:forge_a:0.7>", steps=2)
        assert np.array_equal(with_lora, last_preview(result))
        assert not np.array_equal(with_lora, without_lora)   # the LoRA does something

        # stacking: a second run previews with both LoRAs; Forge's txt2img gives the same pixels
        stacked = "lt_demo, <lora:{name}:0.7> <lora:forge_a:0.5>"
        second = json.loads(tab_api(url, config(forge_data, "forge_b", preview_prompts=[stacked]))[0])
        assert second["status"] == "finished", second
        # the job took forge_a's patches (merged by the txt2img above) off and gave the model back
        assert state(url)["digest"] == before["digest"]
        assert np.array_equal(txt2img(url, stacked.format(name="forge_b"), steps=2), last_preview(second))
    finally:
        stop_forge(server)


def test_kill_forge_mid_run_then_resume(forge_data, tmp_path):
    name = "forge_crash"
    cfg = config(forge_data, name, max_train_steps=8, save_steps=1, preview_prompts=[], resume=True)
    log = forge_data["extension"] / "runs" / name / "logs" / "train.log"
    server = start_forge(forge_data, tmp_path / "first.log")
    try:
        threading.Thread(target=lambda: _ignore_errors(tab_api, server["url"], cfg), daemon=True).start()
        deadline = time.time() + 600
        while not (log.exists() and "event checkpoint: step 2 " in log.read_text()):
            assert time.time() < deadline and server["process"].poll() is None
            time.sleep(0.5)
    finally:
        stop_forge(server, kill=True)   # SIGKILL: no clean stop, no final save

    server = start_forge(forge_data, tmp_path / "restarted.log")
    try:
        result = json.loads(tab_api(server["url"], cfg)[0])
        assert result["status"] == "finished" and result["step"] == 8, result
        assert "run resumed at step" in log.read_text()
        assert Path(result["lora_path"]).exists()
    finally:
        stop_forge(server)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:   # the server is killed under this request on purpose
        pass
