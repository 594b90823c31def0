"""Helpers of the real-WebUI suite (tests/webui). The real-WebUI suite: starts an AUTOMATIC1111 v1.10.1 WebUI on 127.0.0.1 with a tiny SD1 model and
this extension installed, and trains through it. Skipped unless LORA_TRAINER_WEBUI_DIR points at a
WebUI checkout (with its repositories/ and a Python environment); see docs/webui.md.

Environment:
  LORA_TRAINER_WEBUI_DIR      the WebUI folder (launch.py, modules/, repositories/)
  LORA_TRAINER_WEBUI_PYTHON   its Python (default: <dir>/venv/bin/python, else this Python)
  LORA_TRAINER_WEBUI_TIMEOUT  seconds to wait for the server (default 300)

Everything the WebUI writes goes to a temporary --data-dir (models, extensions, config, outputs);
the WebUI checkout itself is not modified.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WEBUI_DIR = os.environ.get("LORA_TRAINER_WEBUI_DIR")
SKIP_REASON = ("real-WebUI suite: set LORA_TRAINER_WEBUI_DIR to an AUTOMATIC1111 v1.10.1 checkout "
               "(with repositories/ and a venv) to run it; see docs/webui.md")
REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "lora-trainer under test"   # a folder name unlike the package's, on purpose

# A test-only extension: routes that run a job / read the model's state under the WebUI's queue
# lock, so tests can drive lora_trainer.webui.job without the tab. Not part of the product.
HARNESS = '''
import json
from fastapi import Body
from modules import call_queue, script_callbacks, shared


def _locked(job_name, fn):
    with call_queue.queue_lock:
        shared.state.begin(job=job_name)
        try:
            return fn()
        finally:
            shared.state.end()
            shared.state.interrupted = False


def app_started(_demo, app):
    @app.post("/lora_trainer_test/train")
    def train(payload: dict = Body(...)):
        from lora_trainer.webui import job
        result = _locked("lora_trainer_test", lambda: job.train_from_json(json.dumps(payload)))
        return {"status": result.status, "step": result.step, "total_steps": result.total_steps,
                "lora_path": str(result.lora_path), "run_dir": str(result.run_dir),
                "last_checkpoint": str(result.last_checkpoint), "message": result.message}

    @app.post("/lora_trainer_test/tab_worker_train")
    def tab_worker_train(payload: dict = Body(...)):
        # the tab's own trainer (Start / Resume through its worker), after an Interrupt that an
        # earlier generation left set; it takes the queue lock itself
        from lora_trainer.training.control import TrainingControl
        from lora_trainer.ui.tab import _webui_settings

        settings, trainer = _webui_settings(None)
        cfg = settings.config_builder(payload)
        shared.state.interrupted = True
        result = trainer(cfg, TrainingControl(), [])
        return {"status": result.status, "step": result.step, "lora_path": str(result.lora_path)}

    @app.get("/lora_trainer_test/matched/{name}")
    def matched(name: str):
        # the WebUI's own loader on the file: how many of its layers find a module of the model
        import networks
        from safetensors import safe_open

        def read():
            networks.list_available_networks()
            on_disk = networks.available_networks[name]
            net = networks.load_network(name, on_disk)
            with safe_open(on_disk.filename, "pt") as f:
                layers = sorted({k.partition(".")[0] for k in f.keys()})
            return {"file_layers": len(layers), "matched": len(net.modules),
                    "text_encoder_layers": sum(k.startswith("lora_te") for k in layers),
                    "sd_version": str(on_disk.sd_version)}
        return _locked("lora_trainer_test_matched", read)

    @app.get("/lora_trainer_test/effect/{name}")
    def effect(name: str):
        # one UNet prediction (after the caption conditioning) with the file's adapters attached as
        # training runs them, and with the WebUI's Lora extension applying the same file at weight 1
        import networks
        import torch
        from lora_trainer.lora.kohya_file import network_from_tensors, read_lora_file
        from lora_trainer.webui import lora_state
        from lora_trainer.webui.backbone import WebuiBackbone
        from lora_trainer.webui.env import WebuiEnv

        def read():
            env = WebuiEnv.current()
            lora_state.clean_base_weights(env.sd_model, networks)
            backbone = WebuiBackbone(env.sd_model, env, resolution=64)
            networks.list_available_networks()
            tensors, _ = read_lora_file(networks.available_networks[name].filename)
            network, unmatched = network_from_tensors(backbone.lora_targets(), tensors)
            network.to(backbone.device)
            sizes = [{"original": (64, 64), "crop": (0, 0), "target": (64, 64)}]
            noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

            def predict():
                with torch.no_grad():
                    cond = backbone.encode_text(["lt_demo, a red circle"], sizes)
                    return backbone.predict(noise, torch.tensor([500]), cond).float().cpu()

            base = predict()
            network.attach()
            try:
                ours = predict()
            finally:
                network.detach()
            networks.load_networks([name], [1.0], [1.0], [None])
            try:
                webui = predict()
            finally:
                networks.loaded_networks.clear()
                lora_state.clean_base_weights(env.sd_model, networks)
            return {"unmatched": len(unmatched), "layers": len(network.adapters),
                    "ours_vs_webui": float((ours - webui).abs().max()),
                    "effect": float((ours - base).abs().max()), "scale": float(base.abs().max())}
        return _locked("lora_trainer_test_effect", read)

    @app.get("/lora_trainer_test/model_state")
    def model_state():
        from lora_trainer.lora import host
        from lora_trainer.webui import lora_state
        from lora_trainer.webui.env import lora_extension_module

        def read():
            model = shared.sd_model
            digests = lora_state.weight_digests(model)
            networks = lora_extension_module()
            return {"digest": lora_state.combined_digest(digests), "tensors": len(digests),
                    "model_id": id(model),
                    "adapter_hosts": sum(host.has_adapters(m) for m in model.modules()),
                    "instance_forwards": sum("forward" in m.__dict__ for m in model.modules()),
                    "requires_grad": sum(p.requires_grad for p in model.parameters()),
                    "loaded_networks": [n.name for n in networks.loaded_networks] if networks else None}
        return _locked("lora_trainer_test_state", read)


def ui_tabs():
    # the job's gradio handler (wrap_gradio_gpu_call: queue lock, task id, progress) on a hidden
    # button, as the Train LoRA tab is asked to wire it
    import gradio as gr
    from lora_trainer.webui import job

    with gr.Blocks(analytics_enabled=False) as tab:
        task, config = gr.Textbox(visible=False), gr.Textbox(visible=False)
        result, status = gr.Textbox(visible=False), gr.HTML(visible=False)
        button = gr.Button(visible=False)
        button.click(fn=job.make_json_train_handler(), inputs=[task, config], outputs=[result, status],
                     api_name="lora_trainer_test_train_json")
    return [(tab, "lora_trainer test harness", "lora_trainer_test_harness")]


script_callbacks.on_app_started(app_started)
script_callbacks.on_ui_tabs(ui_tabs)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, payload=None, timeout=600):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def _webui_python(webui: Path) -> str:
    explicit = os.environ.get("LORA_TRAINER_WEBUI_PYTHON")
    if explicit:
        return explicit
    venv = webui / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def install_extension(extensions_dir: Path) -> Path:
    """Copy the extension the way a user's `git clone` into extensions/ lays it out."""
    target = extensions_dir / EXTENSION_NAME
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("lora_trainer", "scripts", "javascript"):
        if (REPO / part).exists():
            shutil.copytree(REPO / part, target / part, ignore=ignore)
    for part in ("install.py", "style.css", "LICENSE"):
        if (REPO / part).exists():
            shutil.copy2(REPO / part, target / part)
    harness = extensions_dir / "lora_trainer_test_harness" / "scripts"
    harness.mkdir(parents=True)
    (harness / "harness.py").write_text(HARNESS)
    return target




# ---- what the tests ask a running WebUI ------------------------------------------------------------

def pixels(source):
    """An image (path or file object) as int16 RGB, so differences do not wrap around."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(source).convert("RGB"), dtype=np.int16)


# preview settings that equal txt2img()'s defaults below, so a preview can be compared pixel for pixel
PREVIEW_LIKE_TXT2IMG = dict(preview_steps=4, preview_width=64, preview_height=64, preview_seed=1,
                            preview_sampler="euler", preview_cfg_scale=7, preview_negative_prompt="")


def txt2img(url: str, prompt: str, steps: int = 4, seed: int = 1, cfg_scale: float = 7, size: int = 64,
            task_id: str | None = None):
    """The WebUI's txt2img through its API, with the settings the previews in these tests use.
    `task_id`: the id its progress is reported under (`/internal/progress`), as the page sets it."""
    import base64
    import io

    payload = {"prompt": prompt, "negative_prompt": "", "steps": steps, "width": size, "height": size,
               "seed": seed, "sampler_name": "Euler", "cfg_scale": cfg_scale, "batch_size": 1,
               "send_images": True, "save_images": False}
    if task_id is not None:
        payload["force_task_id"] = task_id
    result = http("POST", url + "/sdapi/v1/txt2img", payload)
    return pixels(io.BytesIO(base64.b64decode(result["images"][0])))


def model_state(url: str) -> dict:
    """The loaded model's weights digest, adapters left on it, grad flags, loaded LoRAs (HARNESS)."""
    return http("GET", url + "/lora_trainer_test/model_state")


def harness_train(url: str, dataset, **values) -> dict:
    """A training job through the harness route (under the queue lock), small settings by default."""
    config = dict(train_data_dir=str(dataset), resolution=64, lora_rank=4, batch_size=2,
                  learning_rate=2e-2, max_train_steps=10, save_steps=0, save_precision="fp32",
                  resume=False, preview_prompts=[], write_card=False)
    config.update(values)
    return http("POST", url + "/lora_trainer_test/train", config)


# what webui.py (A1111 and Forge alike) prints after the API routes and every extension's
# app_started callback exist
STARTED_LINE = "Startup time:"


def launch_server(command: list, cwd: Path, env: dict, port: int, log_path: Path, what: str) -> dict:
    """Start a WebUI-like server (`command` listens on `port`) and wait until it answers with every
    route. No request goes out before the start-up line: one that lands between the WebUI's
    setup_middleware() and create_api() builds starlette's middleware stack, and the WebUI then dies
    with "Cannot add middleware after an application has started"."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = {"process": process, "log": log, "log_path": log_path, "url": f"http://127.0.0.1:{port}"}
    deadline = time.time() + float(os.environ.get("LORA_TRAINER_WEBUI_TIMEOUT", "300"))
    try:
        while STARTED_LINE not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited ({process.returncode}):\n{log_path.read_text()[-5000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        http("GET", server["url"] + "/sdapi/v1/sd-models", timeout=60)
        return server
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: dict, kill: bool = False) -> None:
    process = server["process"]
    process.kill() if kill else process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    server["log"].close()
