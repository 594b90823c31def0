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
from fastapi import Body
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
                    "lora_backups": len(unet.lora_loader.backup) + len(clip.patcher.lora_loader.backup),
                    "unet_storage": str(unet.model.storage_dtype),
                    "unet_computation": str(unet.model.computation_dtype)}

    @app.post("/lora_trainer_forge_test/unet_storage")
    def unet_storage(payload: dict = Body(...)):
        # what Forge does when the UNet's storage changes: the "Diffusion in Low Bits" dropdown sets
        # its option and calls refresh_model_loading_parameters (its change handler); a 16-bit
        # storage on the CPU is what --unet-in-bf16 / --unet-in-fp16 give at the next load (here the
        # same loading parameter, so no restart). The model is reloaded at the next forge_model_reload.
        import torch
        from modules import sd_models, shared
        from modules_forge import main_entry

        with call_queue.queue_lock:
            shared.opts.set("forge_unet_storage_dtype", payload.get("low_bits", "Automatic"))
            main_entry.refresh_model_loading_parameters()
            if payload.get("dtype"):
                parameters = sd_models.model_data.forge_loading_parameters
                parameters["unet_storage_dtype"] = getattr(torch, payload["dtype"])
        return {"low_bits": shared.opts.forge_unet_storage_dtype}


script_callbacks.on_app_started(app_started)
'''


def forge_python(root: Path) -> str:
    return os.environ.get("LORA_TRAINER_FORGE_PYTHON") or str(root / "venv" / "bin" / "python")


_written: dict[Path, Path] = {}


def sd15_checkpoint(folder: Path) -> Path:
    """LORA_TRAINER_FORGE_CHECKPOINT, else a random SD1.5-size checkpoint written into `folder`
    once per test session (2 GB, a minute or two): every module's Forge links to the same file."""
    given = os.environ.get("LORA_TRAINER_FORGE_CHECKPOINT")
    if given:
        return Path(given).resolve()
    if folder not in _written:
        from sd15_model import write_random_sd15

        _written[folder] = write_random_sd15(folder / CHECKPOINT)
    return _written[folder]


def prepare_forge_data(data: Path, checkpoint: Path, name: str = CHECKPOINT) -> dict:
    """A Forge --data-dir: the checkpoint (as `name`, the one selected), this extension + the
    harnesses, a dataset."""
    from lora_trainer.tools.demo import write_dataset

    models = data / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (models / name).symlink_to(checkpoint)
    extension = install_extension(data / "extensions")
    harness = data / "extensions" / "lora_trainer_forge_harness" / "scripts"
    harness.mkdir(parents=True)
    (harness / "forge_harness.py").write_text(FORGE_HARNESS)
    (data / "config.json").write_text(json.dumps({"live_previews_enable": False,
                                                  "sd_model_checkpoint": name}))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return {"data": data, "extension": extension, "env": env,
            "dataset": write_dataset(data / "dataset", count=4, size=64)}


def start_forge(prepared: dict, log_path: Path, extra_args: tuple = ()) -> dict:
    """Forge over `prepared["data"]`, up and answering; `extra_args`: more flags (e.g. --listen)."""
    root = Path(FORGE_DIR)
    port = _free_port()
    command = [forge_python(root), "launch.py", "--always-cpu", "--skip-torch-cuda-test",
               "--skip-prepare-environment", "--skip-install", "--skip-version-check",
               "--no-download-sd-model", "--api", "--data-dir", str(prepared["data"]), "--port", str(port),
               *extra_args]
    return launch_server(command, root, prepared["env"], port, log_path, "Forge")


def stop_forge(server: dict, kill: bool = False) -> None:
    stop_server(server, kill)


@pytest.fixture(scope="module")
def forge_data(tmp_path_factory):
    if not FORGE_DIR:
        pytest.skip(SKIP_REASON)
    checkpoint = sd15_checkpoint(tmp_path_factory.getbasetemp())
    return prepare_forge_data(tmp_path_factory.mktemp("forge-data"), checkpoint)


@pytest.fixture(scope="module")
def forge(forge_data, tmp_path_factory):
    """One Forge server for a module's tests, over its forge_data: {url, data, extension, dataset, ...}."""
    server = start_forge(forge_data, tmp_path_factory.mktemp("forge-log") / "forge.log")
    try:
        yield dict(forge_data, url=server["url"], server=server)
    finally:
        stop_forge(server)
