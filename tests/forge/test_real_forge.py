"""The Forge host in a real Stable Diffusion WebUI Forge (CPU, offline; skipped without
LORA_TRAINER_FORGE_DIR, see forge_harness), one Forge server for the module: the tab's JSON endpoint
on Forge's gradio 4 trains the model Forge has loaded and leaves it bit-identical (inference tensors,
no LoRA patch left); the file is on the Lora cards; `<lora:name:0.7>` in Forge's txt2img gives
exactly the in-training preview's pixels, stacked with another LoRA too; generations and jobs wait
for each other through Forge's queue lock and show so on its progress API; Interrupt is a clean
stop with a checkpoint; a UNet stored in bf16 trains in place, FP8 storage is refused with the fix.
The kill -9 / restart / resume check is test_real_forge_restart.py."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from forge_harness import FORGE_DIR, SKIP_REASON, forge, forge_data  # noqa: F401 (fixtures)
from webui_harness import http, pixels, txt2img

from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.storage.checkpoints import CheckpointStore

pytestmark = pytest.mark.skipif(not FORGE_DIR, reason=SKIP_REASON)

# previews rendered exactly as txt2img() below renders (2 Euler steps at 64 px: Forge on 2 CPU cores)
PREVIEWS = dict(preview_steps=2, preview_width=64, preview_height=64, preview_seed=1, preview_sampler="euler",
                preview_cfg_scale=7, preview_negative_prompt="")


def config(forge_data, name, **values):
    return {"train_data_dir": str(forge_data["dataset"]), "output_name": name, "resolution": 64, "lora_rank": 4,
            "batch_size": 1, "learning_rate": 5e-2, "max_train_steps": 2, "save_steps": 0,
            "save_precision": "fp32", "resume": False, "write_card": False, **PREVIEWS, **values}


def tab_api(url: str, cfg: dict, task: str | None = None) -> list:
    """The tab's hidden endpoint, as a script calls it (blocks until the run ends)."""
    task = task or f"task({cfg['output_name']}-{time.time()})"
    return http("POST", url + "/run/lora_trainer_train_json", {"data": [task, json.dumps(cfg)]})["data"]


def state(url: str) -> dict:
    return http("GET", url + "/lora_trainer_forge_test/model_state")


def progress(url: str, task: str) -> dict:
    """Forge's progress endpoint, as the page polls it for a task id."""
    return http("POST", url + "/internal/progress", {"id_task": task, "id_live_preview": -1, "live_preview": False})


def wait_until(condition, request, timeout=600) -> None:
    """Poll `condition` while the background `request` (a Future) is still running."""
    deadline = time.time() + timeout
    while not condition():
        if request.done():
            raise AssertionError(f"the request ended first: {request.result()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def last_preview(result: dict) -> np.ndarray:
    return pixels(Path(result["run_dir"]) / "previews" / f"{result['step']:06d}" / "0.png")


def test_train_on_the_loaded_forge_model(forge):
    url = forge["url"]
    # the Train LoRA tab was built on Forge's gradio 4 (not the placeholder that says why not)
    page = json.dumps(http("GET", url + "/config"))
    assert '"lora_trainer_progress"' in page and '"lora_trainer_train_json"' in page
    assert "Train LoRA is not available" not in page

    # a generation first: Forge converts CLIP's embeddings to fp32 at its first text encoding, so
    # the model's digest is only stable from then on (the job itself settles it the same way)
    without_lora = txt2img(url, "lt_demo", steps=2)
    before = state(url)
    assert before["inference_tensors"] and before["lora_backups"] == 0

    data = tab_api(url, config(forge, "forge_a", preview_prompts=["lt_demo, <lora:{name}:0.7>"]))
    result = json.loads(data[0])
    assert result["status"] == "finished" and result["step"] == 2, data
    after = state(url)
    assert after["digest"] == before["digest"] and after["model_id"] == before["model_id"]
    assert after["inference_tensors"] and after["adapter_hosts"] == 0
    assert after["instance_forwards"] == before["instance_forwards"] and after["lora_backups"] == 0

    lora_dir = forge["data"] / "models" / "Lora"
    assert Path(result["lora_path"]) == lora_dir / "forge_a.safetensors"
    assert "forge_a" in [entry["name"] for entry in http("GET", url + "/sdapi/v1/loras")]

    with_lora = txt2img(url, "lt_demo, <lora:forge_a:0.7>", steps=2)
    assert np.array_equal(with_lora, last_preview(result))
    assert not np.array_equal(with_lora, without_lora)   # the LoRA does something

    # stacking: a second run previews with both LoRAs; Forge's txt2img gives the same pixels
    stacked = "lt_demo, <lora:{name}:0.7> <lora:forge_a:0.5>"
    second = json.loads(tab_api(url, config(forge, "forge_b", preview_prompts=[stacked]))[0])
    assert second["status"] == "finished", second
    # the job took the patches of its stacked previews off and gave the model back; the next
    # generation without a LoRA renders without one (Forge's Lora bookkeeping was reset with them)
    assert state(url)["digest"] == before["digest"]
    assert np.array_equal(txt2img(url, "lt_demo", steps=2), without_lora)
    assert np.array_equal(txt2img(url, stacked.format(name="forge_b"), steps=2), last_preview(second))


def test_a_job_waits_for_the_generation_that_holds_the_lock(forge):
    url, generation_id, job_id = forge["url"], "task(forge-generation-first)", "task(forge-job-second)"
    with ThreadPoolExecutor(2) as pool:
        generation = pool.submit(txt2img, url, "lt_demo", steps=8, task_id=generation_id)
        wait_until(lambda: progress(url, generation_id)["active"], generation)
        job = pool.submit(tab_api, url, config(forge, "forge_after_generation", preview_prompts=[]), job_id)
        queued_behind = False
        while not generation.done():
            # the job first, then the generation: a job seen running must find the generation ended
            job_now, generation_now = progress(url, job_id), progress(url, generation_id)
            assert not (job_now["active"] and generation_now["active"]), (job_now, generation_now)
            queued_behind |= job_now["queued"] and generation_now["active"]
            time.sleep(0.2)
        assert queued_behind, "the job never waited in Forge's queue"
        result = json.loads(job.result()[0])
    assert result["status"] == "finished" and result["step"] == 2, result
    assert progress(url, job_id)["completed"]


def _step(log: Path) -> int:
    steps = re.findall(r"step (\d+)/", log.read_text()) if log.exists() else []
    return int(steps[-1]) if steps else 0


def test_interrupt_stops_the_job_cleanly_while_a_generation_waits_for_it(forge):
    url, name = forge["url"], "forge_interrupted"
    job_id, generation_id = "task(forge-long-job)", "task(forge-generation-waits)"
    unchanged = txt2img(url, "lt_demo", steps=2)
    before = state(url)
    log = forge["extension"] / "runs" / name / "logs" / "train.log"
    long_run = config(forge, name, max_train_steps=1000, epochs=1000, preview_prompts=[])
    with ThreadPoolExecutor(2) as pool:
        job = pool.submit(tab_api, url, long_run, job_id)
        wait_until(lambda: _step(log) >= 1, job)
        shown = progress(url, job_id)   # the job on Forge's progress bar
        assert shown["active"] and (shown["textinfo"] or "").startswith("Step "), shown
        assert 0 < shown["progress"] < 1, shown

        generation = pool.submit(txt2img, url, "lt_demo", steps=2, task_id=generation_id)
        wait_until(lambda: progress(url, generation_id)["queued"], generation)
        step = _step(log)
        wait_until(lambda: _step(log) >= step + 2, job)   # the job goes on; the generation waits
        waiting = progress(url, generation_id)
        assert waiting["queued"] and not waiting["active"] and not generation.done(), waiting

        http("POST", url + "/sdapi/v1/interrupt")
        result = json.loads(job.result(timeout=600)[0])
        image = generation.result(timeout=600)
    assert result["status"] == "stopped" and step + 2 <= result["step"] < 1000, result
    checkpoint, _ = CheckpointStore(Path(result["run_dir"])).latest_valid()
    assert checkpoint is not None and checkpoint.step == result["step"], checkpoint
    assert Path(result["lora_path"]).exists()
    assert np.array_equal(image, unchanged)        # it ran after the job, on the model given back
    after = state(url)
    assert after["digest"] == before["digest"] and after["adapter_hosts"] == 0 and after["inference_tensors"]


def set_unet_storage(url: str, **choice) -> None:
    http("POST", url + "/lora_trainer_forge_test/unet_storage", choice)


def test_bf16_storage_trains_in_place_and_fp8_is_refused_with_the_fix(forge):
    url = forge["url"]
    try:
        set_unet_storage(url, dtype="bfloat16")      # as --unet-in-bf16 loads it
        txt2img(url, "lt_demo", steps=2)             # Forge reloads the checkpoint, CLIP settles
        before = state(url)
        assert before["unet_storage"] == "torch.bfloat16", before
        result = json.loads(tab_api(url, config(forge, "forge_bf16", preview_prompts=[]))[0])
        assert result["status"] == "finished" and result["step"] == 2, result
        after = state(url)
        assert after["digest"] == before["digest"] and after["model_id"] == before["model_id"]
        assert after["unet_storage"] == "torch.bfloat16" and after["inference_tensors"]
        assert f"computes in {before['unet_computation']}" in forge["server"]["log_path"].read_text()
        tensors, _ = read_lora_file(result["lora_path"])   # the LoRA (fp32) learned something
        assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))

        set_unet_storage(url, low_bits="float8-e4m3fn")   # the "Diffusion in Low Bits" dropdown
        data = tab_api(url, config(forge, "forge_fp8", preview_prompts=[]))
        refused = data[-1]                                 # the error, where a result would be HTML
        assert not data[0], data
        assert "float8_e4m3fn" in refused and "Diffusion in Low Bits" in refused, refused
        assert "Automatic" in refused
        assert not (forge["data"] / "models" / "Lora" / "forge_fp8.safetensors").exists()
    finally:
        set_unet_storage(url)   # Automatic: the checkpoint as Forge loads it by default
