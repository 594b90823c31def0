"""Training on a tiny SDXL model loaded in the real WebUI (skipped without LORA_TRAINER_WEBUI_DIR).

Its own WebUI process (module scope) over its own --data-dir: the tiny SDXL checkpoint of
tiny_sdxl_model (SGM layout + `<stem>.yaml` + a local CLIP-L folder), this extension and the test
harness (webui_harness.install_extension), and a second test-only extension whose scripts register
the tiny OpenCLIP arch with open_clip before the WebUI loads the checkpoint and add a probe route
(the WebUI backbone's training inputs, compared with the headless backbone's).
test_real_webui_sd2 reuses this module's server setup and helpers for the tiny SD2-v model.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import webui_harness
from webui_harness import (PREVIEW_LIKE_TXT2IMG, SKIP_REASON, WEBUI_DIR, _webui_python, harness_train, http,
                           install_extension, pixels)

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

PROMPT = "lt_demo, a red circle"
CHECKPOINT = "tiny-sdxl"


# A test-only route of the second test extension: the WebUI backbone's training inputs (caption
# conditioning, a VAE latent, the schedule, one UNet prediction) for fixed inputs, written to a file
# the test compares with the headless backbone's on the same checkpoint.
PROBE_SCRIPT = '''
import torch
from fastapi import Body
from modules import call_queue, script_callbacks
from safetensors.torch import save_file


def app_started(_demo, app):
    @app.post("/lora_trainer_test_tiny/probe")
    def probe(payload: dict = Body(...)):
        from lora_trainer.webui.backbone import WebuiBackbone
        from lora_trainer.webui.env import WebuiEnv

        with call_queue.queue_lock:
            env = WebuiEnv.current()
            backbone = WebuiBackbone(env.sd_model, env, resolution=64)
            sizes = [{"original": (64, 96), "crop": (0, 0), "target": (64, 96)}] * 2   # (height, width)
            with torch.no_grad():
                cond = backbone.encode_text(payload["captions"], sizes)
                pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
                latent = backbone.encode_image(pixels, torch.Generator().manual_seed(5))
                noisy = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
                prediction = backbone.predict(noisy, torch.tensor(payload["timesteps"]), cond)
            out = {"latent": latent, "prediction": prediction, "alphas_cumprod": backbone.alphas_cumprod,
                   **{"cond_" + k: v for k, v in cond.items()}}
            save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, payload["path"])
            return {"prediction_type": backbone.prediction_type, "family": backbone.family.name}


    @app.post("/lora_trainer_test_tiny/attention_effect")
    def attention_effect(payload: dict = Body(...)):
        # the OpenCLIP attention LoRA (random weights) as training applies it (our MultiheadAttention
        # adapters attached) and as the WebUI's Lora extension applies the same file, on the caption
        # conditioning; {max |train - webui|, max |train - base|}
        from lora_trainer.lora.kohya_file import network_from_tensors, network_tensors, save_lora_file
        from lora_trainer.webui import lora_state
        from lora_trainer.webui.backbone import WebuiBackbone
        from lora_trainer.webui.env import WebuiEnv, lora_extension_module

        with call_queue.queue_lock:
            env = WebuiEnv.current()
            networks = lora_extension_module()
            lora_state.clean_base_weights(env.sd_model, networks)
            digest = lora_state.combined_digest(lora_state.weight_digests(env.sd_model))
            backbone = WebuiBackbone(env.sd_model, env, resolution=64)
            targets = [t for t in backbone.lora_targets()
                       if t.name.startswith(payload["prefix"]) and "_self_attn_" in t.name]
            g = torch.Generator().manual_seed(3)
            tensors = {}
            for t in targets:
                tensors[f"{t.name}.lora_down.weight"] = torch.randn(4, t.module.in_features, generator=g) * 0.2
                tensors[f"{t.name}.lora_up.weight"] = torch.randn(t.module.out_features, 4, generator=g) * 0.2
                tensors[f"{t.name}.alpha"] = torch.tensor(2.0)
            network, unmatched = network_from_tensors(targets, tensors)
            assert not unmatched, unmatched
            sizes = [{"original": (64, 96), "crop": (0, 0), "target": (64, 96)}] * 2
            captions = ["lt_demo, a red circle", "a dog"]
            with torch.no_grad():
                base = backbone.encode_text(captions, sizes)["crossattn"]
                network.attach()
                try:
                    cond = backbone.encode_text(captions, sizes)
                finally:
                    network.detach()
                trained = cond["crossattn"]
                save_file({k: v.detach().cpu().contiguous() for k, v in cond.items()}, payload["cond_path"])
                name = payload["name"]
                save_lora_file(payload["lora_dir"] + f"/{name}.safetensors", network_tensors(network), {})
                networks.list_available_networks()
                networks.load_networks([name], [1.0], [1.0], [None])
                try:
                    webui = backbone.encode_text(captions, sizes)["crossattn"]
                finally:
                    networks.loaded_networks.clear()
                    lora_state.clean_base_weights(env.sd_model, networks)
            return {"layers": len(targets), "train_vs_webui": float((trained - webui).abs().max()),
                    "train_vs_base": float((trained - base).abs().max()),
                    "scale": float(trained.abs().max()),
                    "weights_as_before": lora_state.combined_digest(lora_state.weight_digests(env.sd_model)) == digest}


script_callbacks.on_app_started(app_started)
'''


def _install_test_extension(extensions: Path, openclip_dir: Path) -> None:
    """The second test-only extension: registers the tiny OpenCLIP archs (before the checkpoint
    loads) and adds the probe route."""
    from tiny_sdxl_model import open_clip_registration_script

    scripts = extensions / "lora_trainer_test_tiny_models" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "register_tiny_openclip.py").write_text(open_clip_registration_script(openclip_dir))
    (scripts / "probe.py").write_text(PROBE_SCRIPT)


def serve_tiny_model(tmp_path_factory, write_model, checkpoint: str):
    """A WebUI process over a fresh --data-dir with the checkpoint `write_model(models_dir,
    webui_dir, openclip_dir, name=checkpoint)` writes loaded, the tiny OpenCLIP archs registered,
    this extension + the test harness installed and a 6-image dataset (a generator: yields the
    dict the tests take, stops the server afterwards)."""
    from conftest import start_webui, stop_webui

    from lora_trainer.tools.demo import write_dataset

    root = Path(WEBUI_DIR)
    data = tmp_path_factory.mktemp(f"webui-{checkpoint}-data")
    openclip_dir = data / "tiny-openclip"
    write_model(data / "models", root, openclip_dir, name=checkpoint)
    extension = install_extension(data / "extensions")
    _install_test_extension(data / "extensions", openclip_dir)
    (data / "config.json").write_text(json.dumps({
        "live_previews_enable": False,   # no VAE-approx model for SDXL here (it would be downloaded)
        "sd_model_checkpoint": f"{checkpoint}.safetensors",
        "sd_checkpoint_hash": "",
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    server = start_webui(root, _webui_python(root), data, data / "webui.log", env)
    try:
        yield {"url": server["url"], "data": data, "extension": extension, "log": server["log_path"],
               "dataset": write_dataset(data / "dataset", count=6, size=64)}
    finally:
        stop_webui(server)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    if not WEBUI_DIR:
        pytest.skip(SKIP_REASON)
    from tiny_sdxl_model import write_tiny_sdxl_model

    yield from serve_tiny_model(tmp_path_factory, write_tiny_sdxl_model, CHECKPOINT)


def probe_against_headless(webui, checkpoint: str, family: str, tmp_path) -> dict:
    """{name: (max |webui - headless|, max |headless|)} of the training inputs for the same captions,
    pixels, noise and timesteps: the WebUI backbone (in the server) and the headless one (here, on
    the same file)."""
    import torch
    from safetensors.torch import load_file

    captions, timesteps = [PROMPT, "a dog"], [50, 900]
    path = tmp_path / "probe.safetensors"
    info = http("POST", webui["url"] + "/lora_trainer_test_tiny/probe",
                {"path": str(path), "captions": captions, "timesteps": timesteps})
    ours = load_file(path)
    headless = _headless_backbone(webui, checkpoint, family, tmp_path)
    sizes = [{"original": (64, 96), "crop": (0, 0), "target": (64, 96)}] * 2   # (height, width)
    with torch.no_grad():
        cond = headless.encode_text(captions, sizes)
        pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latent = headless.encode_image(pixels, torch.Generator().manual_seed(5))
        noisy = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        prediction = headless.predict(noisy, torch.tensor(timesteps), cond)
    pairs = {"crossattn": (ours["cond_crossattn"], cond["crossattn"]), "latent": (ours["latent"], latent),
             "prediction": (ours["prediction"], prediction)}
    if "cond_vector" in ours:        # SDXL: pooled OpenCLIP output, then the size embeddings
        pooled = cond["text_embeds"]
        pairs["pooled"] = (ours["cond_vector"][:, :pooled.shape[1]], pooled)
    if getattr(headless, "alphas_cumprod", None) is not None:
        pairs["alphas_cumprod"] = (ours["alphas_cumprod"], headless.alphas_cumprod)
    report = {k: (float((a - b).abs().max()), float(b.abs().max())) for k, (a, b) in pairs.items()}
    report["webui"] = info
    report["headless_prediction_type"] = headless.prediction_type
    return report


def headless_layers(webui, checkpoint: str, family: str, tmp_path, **values) -> list[str]:
    """The layers of the file the headless (CLI) trainer writes for the same checkpoint, data and
    settings (one step: only the key set is compared)."""
    from support import write_config

    from lora_trainer.backbones import tiny
    from lora_trainer.config import load_config
    from lora_trainer.app.session import train_from_config

    configs = tmp_path / "cli-configs"
    tiny.write_config_folder(configs, tiny.build_tiny(family, seed=0, with_tokenizer=False)["configs"])
    config = dict(base_model=str(webui["data"] / "models" / "Stable-diffusion" / f"{checkpoint}.safetensors"),
                  base_model_config=str(configs), train_data_dir=str(webui["dataset"]), max_train_steps=1,
                  output_name="cli_lora")
    config.update(values)
    result = train_from_config(load_config(write_config(tmp_path / "cli", **config)))
    return sorted({k.partition(".")[0] for k in lora_tensors(result.lora_path)})


def attention_effect(webui, prefix: str, checkpoint: str, family: str, tmp_path) -> dict:
    """A random LoRA on the OpenCLIP attention layers whose names start with `prefix`: its effect on
    the caption conditioning as the WebUI job trains it (our MultiheadAttention adapters), as the
    WebUI's Lora extension applies the file, and as the headless trainer trains the same file (on
    transformers' CLIP, here): {train_vs_webui, train_vs_headless, train_vs_base, scale, ...}."""
    import torch
    from safetensors.torch import load_file

    from lora_trainer.lora.kohya_file import network_from_tensors

    lora_dir = webui["data"] / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    name = f"attention_effect_{prefix.strip('_')}"
    cond_path = tmp_path / "attention_cond.safetensors"
    report = http("POST", webui["url"] + "/lora_trainer_test_tiny/attention_effect",
                  {"prefix": prefix, "name": name, "lora_dir": str(lora_dir), "cond_path": str(cond_path)})
    ours = load_file(cond_path)
    headless = _headless_backbone(webui, checkpoint, family, tmp_path)
    network, unmatched = network_from_tensors(headless.lora_targets(), lora_tensors(lora_dir / f"{name}.safetensors"))
    assert unmatched == [] and len(network.adapters) == report["layers"], unmatched
    sizes = [{"original": (64, 96), "crop": (0, 0), "target": (64, 96)}] * 2   # (height, width)
    network.attach()
    try:
        with torch.no_grad():
            cond = headless.encode_text(["lt_demo, a red circle", "a dog"], sizes)
    finally:
        network.detach()
    diff = (ours["crossattn"] - cond["crossattn"]).abs().max()
    if "vector" in ours:        # SDXL: pooled OpenCLIP output (the last resblock's attention shows here)
        pooled = cond["text_embeds"]
        diff = max(diff, (ours["vector"][:, :pooled.shape[1]] - pooled).abs().max())
    report["train_vs_headless"] = float(diff)
    return report


def _headless_backbone(webui, checkpoint: str, family: str, tmp_path):
    from lora_trainer.backbones import tiny
    from lora_trainer.backbones.diffusers_sd import load_backbone

    configs = tmp_path / "configs"
    if not configs.exists():
        tiny.write_config_folder(configs, tiny.build_tiny(family, seed=0, with_tokenizer=False)["configs"])
    return load_backbone(str(webui["data"] / "models" / "Stable-diffusion" / f"{checkpoint}.safetensors"),
                         str(configs))


def txt2img(webui, prompt: str) -> np.ndarray:
    return webui_harness.txt2img(webui["url"], prompt)


def model_state(webui) -> dict:
    return webui_harness.model_state(webui["url"])


def train(webui, **values) -> dict:
    return harness_train(webui["url"], webui["dataset"], **{"learning_rate": 3e-2, **values})


def lora_tensors(path) -> dict:
    from lora_trainer.lora.kohya_file import read_lora_file
    return read_lora_file(path)[0]


def same_file(a, b) -> bool:
    x, y = lora_tensors(a), lora_tensors(b)
    return set(x) == set(y) and all(np.array_equal(x[k].numpy(), y[k].numpy()) for k in x)


def test_the_loaded_model_is_the_tiny_sdxl(xl):
    assert CHECKPOINT in http("GET", xl["url"] + "/sdapi/v1/options")["sd_model_checkpoint"]
    models = http("GET", xl["url"] + "/sdapi/v1/sd-models")
    assert any(m["model_name"] == CHECKPOINT and (m.get("config") or "").endswith(f"{CHECKPOINT}.yaml")
               for m in models), models
    log = Path(xl["log"]).read_text()
    assert "Error loading script" not in log, log[-3000:]


def test_train_sdxl_on_the_loaded_model_and_use_the_lora(xl, tmp_path):
    base = txt2img(xl, PROMPT)
    before = model_state(xl)
    assert before["adapter_hosts"] == 0

    name = "xl_lora"
    result = train(xl, output_name=name, target_modules="locon", train_text_encoder=True)
    assert result["status"] == "finished" and result["step"] == 10, result
    lora = Path(result["lora_path"])
    assert lora == xl["data"] / "models" / "Lora" / f"{name}.safetensors" and lora.exists()
    assert model_state(xl) == before      # same model object, bit-identical weights, nothing attached

    layers = sorted({k.partition(".")[0] for k in lora_tensors(lora)})
    te1 = [k for k in layers if k.startswith("lora_te1_")]
    te2 = [k for k in layers if k.startswith("lora_te2_")]
    unet = [k for k in layers if k.startswith("lora_unet_")]
    assert te1 and te2 and unet and len(te1) + len(te2) + len(unet) == len(layers), layers[:10]
    # every layer trained, the text encoders' too (SGM runs frozen embedders under no_grad), but
    # CLIP-L's last layer: SDXL takes CLIP-L's penultimate hidden state (layer_idx), so that layer
    # is not in the forward pass (real SDXL: layer 11 of 12), as in kohya's SDXL files
    tensors = lora_tensors(lora)
    untrained = [k for k in layers if not tensors[f"{k}.lora_up.weight"].abs().max() > 0]
    assert untrained == [k for k in te1 if k.startswith("lora_te1_text_model_encoder_layers_1_")], untrained
    matched = http("GET", xl["url"] + f"/lora_trainer_test/matched/{name}")
    print(f"SDXL file: {len(layers)} layers (unet {len(unet)}, te1 {len(te1)}, te2 {len(te2)}); {matched}")
    assert matched["sd_version"] == "SdVersion.SDXL", matched
    assert matched["file_layers"] == len(layers) and matched["matched"] == len(layers), matched
    assert matched["text_encoder_layers"] == len(te1) + len(te2)
    # OpenCLIP's attention (one nn.MultiheadAttention per resblock) is trained as its q/k/v/out
    # projections, under the names the headless trainer uses: the same layers as the CLI's file
    te2_blocks = sorted({int(k.split("_layers_")[1].split("_")[0]) for k in te2})
    assert te2_blocks and set(te2) == {f"lora_te2_text_model_encoder_layers_{i}_{part}" for i in te2_blocks
                                       for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                                    "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}, te2
    cli = headless_layers(xl, CHECKPOINT, "sdxl", tmp_path, target_modules="locon", train_text_encoder=True)
    assert layers == cli, sorted(set(layers) ^ set(cli))

    with_lora = txt2img(xl, f"{PROMPT} <lora:{name}:0.7>")
    print(f"<lora:{name}:0.7> vs base: max {np.abs(with_lora - base).max()}, "
          f"mean {np.abs(with_lora - base).mean():.2f} (0-255)")
    assert np.abs(with_lora - base).max() > 0, "the LoRA does not change the image"

    # the WebUI has that LoRA merged into the weights now (SDXL's OpenCLIP attention included in its
    # backups); training again over the same file starts from the clean weights, and the next
    # generation uses the new file, not a cached merge or cached conditioning
    merged = model_state(xl)
    assert merged["loaded_networks"] == [name] and merged["digest"] != before["digest"]
    again = train(xl, output_name=name, max_train_steps=4, seed=7, train_text_encoder=True)
    assert again["status"] == "finished"
    assert model_state(xl) == before
    assert not np.array_equal(txt2img(xl, f"{PROMPT} <lora:{name}:0.7>"), with_lora)
    assert np.array_equal(txt2img(xl, f"{PROMPT} <lora:{name}:0>"), base)
    assert np.array_equal(txt2img(xl, PROMPT), base)
    assert model_state(xl) == before


def test_sdxl_previews_are_what_txt2img_produces(xl):
    before = model_state(xl)
    name = "xl_preview_lora"
    prompts = [PROMPT, f"{PROMPT} <lora:{{name}}:0.7>"]
    settings = dict(preview_every_n_steps=5, **PREVIEW_LIKE_TXT2IMG)
    result = train(xl, output_name=name, preview_prompts=prompts, **settings)
    assert result["status"] == "finished", result
    assert model_state(xl) == before
    folder = Path(result["run_dir"]) / "previews"
    final = [pixels(folder / "000010" / f"{n}.png") for n in (0, 1)]
    print(f"SDXL preview with LoRA vs base: max {np.abs(final[1] - final[0]).max()}")
    assert np.abs(final[1] - final[0]).max() > 0, "the preview does not show the LoRA"
    assert np.array_equal(final[0], txt2img(xl, PROMPT))
    assert np.array_equal(final[1], txt2img(xl, f"{PROMPT} <lora:{name}:0.7>"))
    step5 = pixels(folder / "000005" / "1.png")
    assert not np.array_equal(step5, final[1])
    # the same run without previews trains the same file
    plain = train(xl, output_name=name + "_plain")
    assert same_file(result["lora_path"], plain["lora_path"])
    assert model_state(xl) == before


def test_sdxl_stopped_and_resumed_run_gives_the_uninterrupted_file(xl):
    name = "xl_resumed"
    cfg = dict(output_name=name, resume=True, epochs=1000, max_train_steps=5000, save_steps=2)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("result", train(xl, **cfg)))
    worker.start()
    log = xl["extension"] / "runs" / name / "logs" / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and "step 1/5000" in log.read_text()):   # training is under way
        assert time.time() < deadline and worker.is_alive()
        time.sleep(0.1)
    http("POST", xl["url"] + "/sdapi/v1/interrupt")
    worker.join(timeout=300)
    stopped = box["result"]
    assert stopped["status"] == "stopped" and 0 < stopped["step"] < 5000, stopped
    goal = stopped["step"] + 4
    resumed = train(xl, **{**cfg, "max_train_steps": goal, "force_resume": True})
    assert resumed["status"] == "finished" and resumed["step"] == goal, resumed
    assert f"run resumed at step {stopped['step']} of {goal}" in log.read_text()
    straight = train(xl, output_name=name + "_straight", resume=False, epochs=1000, max_train_steps=goal)
    print(f"stopped at {stopped['step']}, resumed to {goal}")
    assert same_file(resumed["lora_path"], straight["lora_path"])


def test_sdxl_training_inputs_are_the_headless_trainers(xl, tmp_path):
    """What the WebUI backbone trains on (its SGM conditioner via get_learned_conditioning with the
    image size, its VAE, its schedule, its UNet) is what the headless trainer computes from the same
    file: the same captions, pixels, noise and timesteps agree to float32 rounding; a 96x64 (wide)
    size, so the UNet's size embedding sees width and height the same way round."""
    report = probe_against_headless(xl, CHECKPOINT, "sdxl", tmp_path)
    print(f"SDXL WebUI vs headless (max diff, scale): {report}")
    assert report["webui"] == {"prediction_type": "epsilon", "family": "sdxl"}
    for name in ("crossattn", "pooled", "latent", "alphas_cumprod", "prediction"):
        diff, scale = report[name]
        assert diff <= 1e-5 * max(1.0, scale), (name, report)


def test_sdxl_openclip_attention_lora_in_training_is_what_the_webui_applies(xl, tmp_path):
    """te2's attention LoRA (random, large) changes the caption conditioning during training (our
    MultiheadAttention adapters) exactly as the WebUI's Lora extension does when it applies the same
    file (merged into in_proj_weight / out_proj.weight), and as the headless trainer trains it (four
    Linear LoRAs on transformers' CLIP), to float32 rounding."""
    report = attention_effect(xl, "lora_te2_", CHECKPOINT, "sdxl", tmp_path)
    print(f"SDXL te2 attention LoRA: {report}")
    assert report["layers"] == 4 * 2      # q/k/v/out of the tiny OpenCLIP's 2 resblocks
    assert report["train_vs_base"] > 1e-2 * max(1.0, report["scale"]), report
    assert report["train_vs_webui"] <= 1e-5 * max(1.0, report["scale"]), report
    assert report["train_vs_headless"] <= 1e-5 * max(1.0, report["scale"]), report
    assert report["weights_as_before"] and model_state(xl)["adapter_hosts"] == 0


def test_sdxl_gradient_checkpointing_trains_the_same_file(xl):
    """Gradient checkpointing wraps SGM's BasicTransformerBlock / ResBlock (recomputed in backward):
    the same LoRA as without it, and the model is as before."""
    before = model_state(xl)
    values = dict(max_train_steps=3, target_modules="locon", train_text_encoder=True)
    checkpointed = train(xl, output_name="xl_gc", gradient_checkpointing=True, **values)
    plain = train(xl, output_name="xl_no_gc", gradient_checkpointing=False, **values)
    assert checkpointed["status"] == plain["status"] == "finished"
    assert same_file(checkpointed["lora_path"], plain["lora_path"])
    assert model_state(xl) == before
