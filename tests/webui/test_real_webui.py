"""Training on the real WebUI's loaded model (see conftest.py: skipped without LORA_TRAINER_WEBUI_DIR)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import webui_harness
from webui_harness import PREVIEW_LIKE_TXT2IMG, SKIP_REASON, WEBUI_DIR, harness_train, http, pixels

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

PROMPT = "lt_demo, a red circle"


def txt2img(webui, prompt: str) -> np.ndarray:
    return webui_harness.txt2img(webui["url"], prompt)


def model_state(webui) -> dict:
    return webui_harness.model_state(webui["url"])


def train(webui, **values) -> dict:
    return harness_train(webui["url"], webui["dataset"], **values)


def test_extension_loads_with_its_tab_and_settings(webui):
    options = http("GET", webui["url"] + "/sdapi/v1/options")
    assert options["lora_trainer_output_dir"] == ""
    assert options["lora_trainer_preview_steps"] == 20
    config = http("GET", webui["url"] + "/config")
    assert "Train LoRA" in json.dumps(config)
    log = Path(webui["log"]).read_text()
    assert "Error loading script: lora_trainer_tab.py" not in log


def test_train_on_the_loaded_model_and_use_the_lora(webui):
    base = txt2img(webui, PROMPT)
    before = model_state(webui)
    assert before["adapter_hosts"] == 0

    result = train(webui, output_name="webui_test_lora", target_modules="locon", train_text_encoder=True)
    assert result["status"] == "finished" and result["step"] == 10, result
    lora = Path(result["lora_path"])
    assert lora == webui["data"] / "models" / "Lora" / "webui_test_lora.safetensors" and lora.exists()
    assert Path(result["run_dir"]) == webui["extension"] / "runs" / "webui_test_lora"

    after = model_state(webui)
    assert after == before     # same model object, bit-identical weights, nothing left attached

    listed = [x["name"] for x in http("GET", webui["url"] + "/sdapi/v1/loras")]
    assert "webui_test_lora" in listed
    # every layer of the file (all roles, text encoder included) lands on a module of the model
    matched = http("GET", webui["url"] + "/lora_trainer_test/matched/webui_test_lora")
    assert matched["file_layers"] == 129 and matched["matched"] == 129, matched
    assert matched["text_encoder_layers"] == 12 and matched["sd_version"] == "SdVersion.SD1"
    with_lora = txt2img(webui, f"{PROMPT} <lora:webui_test_lora:0.7>")
    print(f"<lora:webui_test_lora:0.7> vs base: max {np.abs(with_lora - base).max()}, "
          f"mean {np.abs(with_lora - base).mean():.2f} (0-255)")
    assert np.abs(with_lora - base).max() > 0, "the LoRA does not change the image"

    # the WebUI has that LoRA merged into the weights right now; train again over the same file:
    # the job starts from the clean weights, and the next generation uses the new file, not a
    # cached merge or cached conditioning
    merged = model_state(webui)
    assert merged["loaded_networks"] == ["webui_test_lora"] and merged["digest"] != before["digest"]
    again = train(webui, output_name="webui_test_lora", learning_rate=5e-2, seed=7)
    assert again["status"] == "finished"
    assert model_state(webui) == before
    retrained = txt2img(webui, f"{PROMPT} <lora:webui_test_lora:0.7>")
    assert not np.array_equal(retrained, with_lora)
    assert np.array_equal(txt2img(webui, f"{PROMPT} <lora:webui_test_lora:0>"), base)
    assert np.array_equal(txt2img(webui, PROMPT), base)
    assert model_state(webui) == before


def test_interrupt_is_a_clean_stop_with_a_checkpoint(webui):
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault(
        "result", train(webui, output_name="webui_interrupted", epochs=1000, max_train_steps=5000)))
    worker.start()
    log = webui["extension"] / "runs" / "webui_interrupted" / "logs" / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and "step 1/5000" in log.read_text()):   # training is under way
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.2)
    http("POST", webui["url"] + "/sdapi/v1/interrupt")
    worker.join(timeout=300)
    result = box["result"]
    assert result["status"] == "stopped" and 0 < result["step"] < 5000, result
    assert Path(result["last_checkpoint"]).exists() and Path(result["lora_path"]).exists()
    assert model_state(webui)["adapter_hosts"] == 0


def _tab_endpoint(webui, api_name: str):
    config = http("GET", webui["url"] + "/config")
    for i, dep in enumerate(config.get("dependencies", [])):
        if dep.get("api_name") == api_name:
            return i
    return None


def train_through_gradio(webui, api_name: str, output_name: str, **values):
    """POST /run/<api_name> with (task id, config JSON) while polling the progress endpoint, as the
    browser does with requestProgress()."""
    task = f"task({output_name})"
    config = {"train_data_dir": str(webui["dataset"]), "output_name": output_name, "resolution": 64,
              "lora_rank": 4, "max_train_steps": 40, "epochs": 10, "save_steps": 0, "resume": False,
              "preview_prompts": [], "write_card": False, **values}
    box, progress = {}, []

    def run():
        box["response"] = http("POST", webui["url"] + f"/run/{api_name}",
                               {"data": [task, json.dumps(config)]})

    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        progress.append(http("POST", webui["url"] + "/internal/progress",
                             {"id_task": task, "id_live_preview": -1, "live_preview": False}))
        time.sleep(0.2)
    worker.join()
    data = box["response"]["data"]
    assert "Time taken" in data[-1]          # the last output is the HTML the WebUI appends to
    payload = json.loads(data[0])
    assert payload["status"] == "finished" and Path(payload["lora_path"]).exists(), data
    active = [p for p in progress if p.get("active")]
    assert any((p.get("textinfo") or "").startswith("Step ") for p in active), progress[-5:]
    assert any(0 < (p.get("progress") or 0) <= 1 for p in active), progress[-5:]
    done = http("POST", webui["url"] + "/internal/progress", {"id_task": task, "live_preview": False})
    assert done["completed"] and not done["active"]
    return payload


def test_gradio_handler_holds_the_lock_and_drives_the_progress_bar(webui):
    """job.make_json_train_handler on a hidden button of the test harness; with previews (rendered
    through the WebUI's process_images, see test_previews_are_what_txt2img_produces) and the Lora
    card files."""
    before = model_state(webui)
    payload = train_through_gradio(webui, "lora_trainer_test_train_json", "webui_handler_lora",
                                   preview_prompts=[f"{PROMPT} <lora:webui_handler_lora:0.7>"],
                                   preview_every_n_steps=20, preview_steps=2, write_card=True)
    assert (Path(payload["run_dir"]) / "previews" / "000020" / "0.png").exists()
    assert (Path(payload["lora_path"]).with_suffix(".preview.png")).exists()
    assert model_state(webui) == before


def test_train_through_the_tab_api_with_progress(webui):
    if _tab_endpoint(webui, "lora_trainer_train_json") is None:
        pytest.skip("the Train LoRA tab does not expose api_name='lora_trainer_train_json' yet "
                    "(lora_trainer.ui.tab wires job.make_json_train_handler to a hidden button)")
    train_through_gradio(webui, "lora_trainer_train_json", "webui_api_lora")


def test_previews_are_what_txt2img_produces(webui):
    """Previews through the WebUI's own process_images: the saved LoRA applied by the Lora
    extension, so a preview is pixel for pixel what txt2img gives for the same prompt and settings;
    the model is clean afterwards and training is unaffected by previewing."""
    before = model_state(webui)
    name = "webui_preview_lora"
    prompts = [PROMPT, f"{PROMPT} <lora:{{name}}:0.7>"]
    settings = dict(preview_every_n_steps=5, **PREVIEW_LIKE_TXT2IMG)
    result = train(webui, output_name=name, preview_prompts=prompts, **settings)
    assert result["status"] == "finished", result
    assert model_state(webui) == before
    folder = Path(result["run_dir"]) / "previews"
    assert (folder / "000005" / "1.png").exists()
    final = [pixels(folder / "000010" / f"{n}.png") for n in (0, 1)]
    print(f"preview with LoRA vs base: max {np.abs(final[1] - final[0]).max()}")
    assert np.abs(final[1] - final[0]).max() > 0, "the preview does not show the LoRA"
    assert np.array_equal(final[0], txt2img(webui, PROMPT))
    assert np.array_equal(final[1], txt2img(webui, f"{PROMPT} <lora:{name}:0.7>"))
    step5 = pixels(folder / "000005" / "1.png")
    assert not np.array_equal(step5, final[1])      # not a stale merge or cached conditioning
    # the same run without previews trains the same file
    plain = train(webui, output_name=name + "_plain")
    from lora_trainer.lora.kohya_file import read_lora_file
    a, b = read_lora_file(result["lora_path"])[0], read_lora_file(plain["lora_path"])[0]
    assert set(a) == set(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert model_state(webui) == before


def test_tab_worker_trains_after_an_interrupted_generation(webui):
    """The tab's Start/Resume path (its worker's trainer, which takes the queue lock itself) begins
    a fresh WebUI job state: an Interrupt left over from a generation does not stop it at once."""
    result = http("POST", webui["url"] + "/lora_trainer_test/tab_worker_train",
                  {"train_data_dir": str(webui["dataset"]), "output_name": "webui_tab_worker_lora",
                   "resolution": 64, "lora_rank": 4, "max_train_steps": 5, "save_steps": 0,
                   "resume": False, "preview_prompts": [], "write_card": False})
    assert result["status"] == "finished" and result["step"] == 5, result
