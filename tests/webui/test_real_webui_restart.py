"""Resume after a WebUI restart (real WebUI; skipped without LORA_TRAINER_WEBUI_DIR): a run stopped
in one WebUI process continues in a new process over the same data folder with the same checkpoint
loaded, through the tab's JSON API; with another checkpoint loaded it is refused with a message
that says what to load."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import start_webui, stop_webui
from webui_harness import SKIP_REASON, WEBUI_DIR, http

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

NAME = "webui_restart_lora"


def config(webui, **values):
    return {"train_data_dir": str(webui["dataset"]), "output_name": NAME, "resolution": 64, "lora_rank": 4,
            "batch_size": 2, "learning_rate": 2e-2, "max_train_steps": 5000, "epochs": 1000, "save_steps": 0,
            "resume": True, "preview_prompts": [], "write_card": False, **values}


def tab_api(url: str, cfg: dict) -> list:
    return http("POST", url + "/run/lora_trainer_train_json",
                {"data": [f"task({NAME}-{time.time()})", json.dumps(cfg)]})["data"]


def test_resume_in_a_restarted_webui_and_refusal_on_another_model(webui, tmp_path):
    from tiny_model import write_tiny_webui_model

    # 1. first process: start, interrupt after a few steps (checkpoint written)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("data", tab_api(webui["url"], config(webui))))
    worker.start()
    log = webui["extension"] / "runs" / NAME / "logs" / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and "step 1/5000" in log.read_text()):
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.2)
    http("POST", webui["url"] + "/sdapi/v1/interrupt")
    worker.join(timeout=300)
    stopped = json.loads(box["data"][0])
    assert stopped["status"] == "stopped" and 0 < stopped["step"] < 5000, stopped
    goal = stopped["step"] + 20          # max_train_steps may change on resume

    # 2. a new WebUI process over the same data folder (same checkpoint): the run continues there
    server = start_webui(webui["root"], webui["python"], webui["data"], tmp_path / "restarted.log", webui["env"])
    try:
        url = server["url"]
        data = tab_api(url, config(webui, max_train_steps=goal, force_resume=True))
        resumed = json.loads(data[0])
        assert resumed["status"] == "finished" and resumed["step"] == goal, data
        assert f"run resumed at step {stopped['step']} of {goal}" in log.read_text()
        assert Path(resumed["lora_path"]).exists()

        # 3. another checkpoint loaded: refused with what to do, nothing trained
        write_tiny_webui_model(webui["data"] / "models", name="tiny-sd1-other", seed=1)
        http("POST", url + "/sdapi/v1/refresh-checkpoints")
        http("POST", url + "/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd1-other.safetensors"})
        assert "tiny-sd1-other" in http("GET", url + "/sdapi/v1/options")["sd_model_checkpoint"]
        data = tab_api(url, config(webui, max_train_steps=goal + 10, force_resume=True))
        assert data[0] in ("", None) or json.loads(data[0]).get("status") != "finished", data
        assert "was trained on tiny-sd1.safetensors" in data[-1] and "Load the run" in data[-1], data
    finally:
        stop_webui(server)
