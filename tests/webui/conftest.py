"""Fixture of the real-WebUI suite; skipped unless LORA_TRAINER_WEBUI_DIR is set (see webui_harness)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from webui_harness import (SKIP_REASON, WEBUI_DIR, _free_port, _webui_python,  # noqa: E402
                           install_extension, launch_server, stop_server)


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


def start_webui(root: Path, python: str, data: Path, log_path: Path, env: dict,
                extra_args: tuple = ()) -> dict:
    """A WebUI server on a free port over `data` (--data-dir), up and answering with every route
    (the test harness's too); a second one over the same folder is what a restart sees.
    `extra_args`: more command-line flags (e.g. --medvram)."""
    port = _free_port()
    command = [python, "launch.py", "--data-dir", str(data), "--use-cpu", "all", "--no-half", "--precision",
               "full", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-install",
               "--skip-version-check", "--no-download-sd-model", "--api", "--port", str(port), *extra_args]
    return launch_server(command, root, env, port, log_path, "the WebUI")


def stop_webui(server: dict) -> None:
    stop_server(server)
