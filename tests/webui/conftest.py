"""Fixture of the real-WebUI suite; skipped unless LORA_TRAINER_WEBUI_DIR is set (see webui_harness)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from webui_harness import (SKIP_REASON, WEBUI_DIR, _free_port, _webui_python, http,  # noqa: E402
                           install_extension)


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    if not WEBUI_DIR:
        pytest.skip(SKIP_REASON)
    data = tmp_path_factory.mktemp("webui-data")
    prepared = prepare_webui_data(data)
    root, python, env, extension = prepared["root"], prepared["python"], prepared["env"], prepared["extension"]
    server = start_webui(root, python, data, data / "webui.log", env)
    try:
        yield {"url": server["url"], "data": data, "extension": extension, "log": server["log_path"],
               "dataset": prepared["dataset"], "root": root, "python": python, "env": env}
    finally:
        stop_webui(server)


def prepare_webui_data(data: Path) -> dict:
    """A WebUI --data-dir with the tiny SD1 checkpoint, this extension (and the test harness) in
    extensions/, its installer run, and a 6-image dataset: {root, python, data, extension, env,
    dataset}. Each module that needs a server of its own (e.g. one it kills) calls this on a fresh
    folder and `start_webui` on it."""
    from tiny_model import write_tiny_webui_model

    from lora_trainer.tools.demo import write_dataset

    root = Path(WEBUI_DIR)
    python = _webui_python(root)
    write_tiny_webui_model(data / "models")
    extension = install_extension(data / "extensions")
    (data / "config.json").write_text(json.dumps({
        "live_previews_enable": False,            # no VAE-approx model download for SD1-sized previews
        "sd_model_checkpoint": "tiny-sd1.safetensors",
        "sd_checkpoint_hash": "",
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    # the extension's installer, as the WebUI runs it (PYTHONPATH = the WebUI folder)
    install = subprocess.run([python, str(extension / "install.py")], cwd=root, capture_output=True,
                             text=True, env={**env, "PYTHONPATH": str(root)}, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return {"root": root, "python": python, "data": data, "extension": extension, "env": env,
            "dataset": write_dataset(data / "dataset", count=6, size=64)}


# what webui.py prints after the API routes and every extension's app_started callback exist
STARTED_LINE = "Startup time:"


def start_webui(root: Path, python: str, data: Path, log_path: Path, env: dict,
                extra_args: tuple = ()) -> dict:
    """A WebUI server on a free port over `data` (--data-dir), up and answering with every route
    (the test harness's too); a second one over the same folder is what a restart sees.
    `extra_args`: more command-line flags (e.g. --medvram)."""
    port = _free_port()
    log = open(log_path, "w")
    process = subprocess.Popen(
        [python, "launch.py", "--data-dir", str(data), "--use-cpu", "all", "--no-half", "--precision",
         "full", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-install",
         "--skip-version-check", "--no-download-sd-model", "--api", "--port", str(port), *extra_args],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = {"process": process, "log": log, "log_path": log_path, "url": f"http://127.0.0.1:{port}"}
    deadline = time.time() + float(os.environ.get("LORA_TRAINER_WEBUI_TIMEOUT", "300"))
    try:
        # No request before the start-up line: one that lands between the WebUI's setup_middleware()
        # and create_api() builds starlette's middleware stack, and the WebUI then dies with
        # "Cannot add middleware after an application has started".
        while STARTED_LINE not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"the WebUI exited ({process.returncode}):\n{log_path.read_text()[-5000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"the WebUI did not come up:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        http("GET", server["url"] + "/sdapi/v1/sd-models", timeout=60)
        return server
    except BaseException:
        stop_webui(server)
        raise


def stop_webui(server: dict) -> None:
    process = server["process"]
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    server["log"].close()
