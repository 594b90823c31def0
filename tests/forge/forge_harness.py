"""Helpers and the fixture of the real-Forge suite (tests/forge; not a conftest.py, whose module name
would clash with tests/webui's). The real-Forge suite: starts Stable Diffusion WebUI Forge on 127.0.0.1, on the CPU, offline, with a
random-weight checkpoint of the real SD1.5 architecture (Forge builds its models from its own shipped
configs, so a tiny model will not load) and this extension installed; trains through it. Skipped
unless LORA_TRAINER_FORGE_DIR points at a Forge checkout with its repositories/huggingface_guess and
a venv (docs/forge.md).

Environment:
  LORA_TRAINER_FORGE_DIR         the Forge folder (launch.py, modules/, backend/, repositories/)
  LORA_TRAINER_FORGE_PYTHON      its Python (default <dir>/venv/bin/python)
  LORA_TRAINER_FORGE_CHECKPOINT  an SD1.5-architecture .safetensors to use (default: one is written,
                                 about 2 GB and a minute or two, into the temporary data folder)
  LORA_TRAINER_WEBUI_TIMEOUT     seconds to wait for the server (default 300)
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "webui"))
from webui_harness import _free_port, install_extension, launch_server, stop_server  # noqa: E402

FORGE_DIR = os.environ.get("LORA_TRAINER_FORGE_DIR")
SKIP_REASON = ("real-Forge suite: set LORA_TRAINER_FORGE_DIR to a Stable Diffusion WebUI Forge checkout "
               "(with repositories/huggingface_guess and a venv) to run it; see docs/forge.md")
CHECKPOINT = "random-sd15.safetensors"

# Test-only routes next to the A1111 harness's (whose /lora_trainer_test/train runs a job under the
# queue lock and works in Forge too): the Forge model's state, through the host's own view of it.
FORGE_HARNESS = '''
from modules import call_queue, script_callbacks


def app_started(_demo, app):
    @app.get("/lora_trainer_forge_test/model_state")
    def model_state():
        from lora_trainer.lora import host
        from lora_trainer.webui import forge, lora_state

        with call_queue.queue_lock:
            model = forge.forge_loaded_model()
            view = forge.model_view(model)
            unet, clip, _ = forge.forge_parts(model)
            return {"digest": lora_state.combined_digest(lora_state.weight_digests(view)),
                    "model_id": id(model),
                    "inference_tensors": all(p.is_inference() for p in view.parameters()),
                    "adapter_hosts": sum(host.has_adapters(m) for m in view.modules()),
                    "instance_forwards": sum("forward" in m.__dict__ for m in view.modules()),
                    "lora_backups": len(unet.lora_loader.backup) + len(clip.patcher.lora_loader.backup)}


script_callbacks.on_app_started(app_started)
'''


def forge_python(root: Path) -> str:
    return os.environ.get("LORA_TRAINER_FORGE_PYTHON") or str(root / "venv" / "bin" / "python")


def prepare_forge_data(data: Path) -> dict:
    """A Forge --data-dir: the SD1.5-shaped checkpoint, this extension + the harnesses, a dataset."""
    from sd15_model import write_random_sd15

    from lora_trainer.tools.demo import write_dataset

    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    given = os.environ.get("LORA_TRAINER_FORGE_CHECKPOINT")
    if given:
        (models / CHECKPOINT).symlink_to(Path(given).resolve())
    else:
        write_random_sd15(models / CHECKPOINT)
    extension = install_extension(data / "extensions")
    harness = data / "extensions" / "lora_trainer_forge_harness" / "scripts"
    harness.mkdir(parents=True)
    (harness / "forge_harness.py").write_text(FORGE_HARNESS)
    (data / "config.json").write_text(json.dumps({"live_previews_enable": False,
                                                  "sd_model_checkpoint": CHECKPOINT}))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return {"data": data, "extension": extension, "env": env,
            "dataset": write_dataset(data / "dataset", count=4, size=64)}


def start_forge(prepared: dict, log_path: Path) -> dict:
    root = Path(FORGE_DIR)
    port = _free_port()
    command = [forge_python(root), "launch.py", "--always-cpu", "--skip-torch-cuda-test",
               "--skip-prepare-environment", "--skip-install", "--skip-version-check",
               "--no-download-sd-model", "--api", "--data-dir", str(prepared["data"]), "--port", str(port)]
    return launch_server(command, root, prepared["env"], port, log_path, "Forge")


def stop_forge(server: dict, kill: bool = False) -> None:
    stop_server(server, kill)


@pytest.fixture(scope="module")
def forge_data(tmp_path_factory):
    if not FORGE_DIR:
        pytest.skip(SKIP_REASON)
    return prepare_forge_data(tmp_path_factory.mktemp("forge-data"))
