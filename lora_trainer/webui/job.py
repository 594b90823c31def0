"""One training job inside the WebUI: checks, clean weights, the loop, and putting everything back.

`train_on_loaded_model(cfg)` is the whole job. It must run while holding the WebUI's GPU lock
(`modules.call_queue.queue_lock`), like every generation: use `make_train_handler` to get a gradio
click handler wrapped in `wrap_gradio_gpu_call`, which takes the lock, registers the task id for
the progress bar (`/internal/progress`) and turns an exception into an error message. The lock is
a non-reentrant FIFO lock: nothing inside a job may call the WebUI's HTTP API (deadlock).

Order of a job:
1. refuse what cannot work (no model, --lowvram, inpainting/fp8/SD3 models; in Forge: low-bit
   storage, families other than SD1);
2. `clean_base_weights`: undo LoRAs the last generation merged into the weights, verify (Forge:
   `forge.clean_forge_weights`, and weights autograd can use for the job: `forge.AutogradWeights`);
3. `ModelGuard`: digest of every weight; on exit adapters off, flags back, digest checked;
4. `run_training` with the WebUI backbone, the progress observer (Interrupt = clean stop with a
   checkpoint) and an observer that refreshes the WebUI's Lora caches after each save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import logging
import os
import sys
from pathlib import Path

import torch

from ..training.control import TrainingControl, TrainingObserver
from .backbone import WebuiBackbone
from .env import WebuiEnv
from .lora_state import ModelGuard, clean_base_weights, invalidate_webui_lora_caches
from .paths import check_run_dir, extension_dir, webui_defaults
from .progress import WebuiProgress

log = logging.getLogger("lora_trainer")

# the control of the job running now (jobs never overlap: they hold the WebUI's queue lock)
_current_control: TrainingControl | None = None


class CannotTrain(RuntimeError):
    """A refusal with a message meant for the user."""


# ---- checks -----------------------------------------------------------------------------------------

def check_can_train(env: WebuiEnv) -> None:
    model = env.sd_model
    if model is None:
        raise CannotTrain("No Stable Diffusion model is loaded; pick a checkpoint first.")
    if env.is_forge or hasattr(model, "forge_objects"):
        from .forge import CannotTrainOnForge, check_can_train_forge
        try:
            check_can_train_forge(model)
        except CannotTrainOnForge as e:
            raise CannotTrain(str(e)) from e
        return
    if getattr(model, "model", None) is None:
        raise CannotTrain("The loaded model is neither AUTOMATIC1111's (v1.10) nor Forge's; it cannot be trained.")
    if env.cmd_option("lowvram", False):
        raise CannotTrain("The WebUI runs with --lowvram, which keeps the model in pieces on the CPU; "
                          "training needs it on the GPU. Restart the WebUI without --lowvram "
                          "(--medvram works).")
    if getattr(model, "is_sd3", False):
        raise CannotTrain("SD3 models are not supported; load an SD1, SD2 or SDXL checkpoint.")
    unet = model.model.diffusion_model
    in_channels = getattr(unet, "in_channels", 4)
    if in_channels != 4:
        raise CannotTrain(f"The loaded model's UNet takes {in_channels} input channels (an inpainting "
                          "or depth model); load a regular checkpoint to train a LoRA.")
    float8 = {d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d}
    if any(p.dtype in float8 for p in unet.parameters()):
        raise CannotTrain("The model's weights are stored in FP8 (Settings > Optimizations > FP8 weight); "
                          "switch FP8 off to train.")


def check_resume_model(cfg, backbone: WebuiBackbone) -> None:
    """A run that resumes must continue on the model it was trained on: the same checkpoint file
    (fingerprint), VAE and CLIP skip, which survive a WebUI restart. Refuses with what to load."""
    if not cfg.resume:
        return
    from ..storage.checkpoints import STATE_NAME, CheckpointStore

    info, _ = CheckpointStore(Path(cfg.run_dir)).latest_valid()
    if info is None:
        return
    try:
        trained = json.loads((Path(info.path) / STATE_NAME).read_text(encoding="utf-8")).get("base_model") or {}
    except (OSError, ValueError, AttributeError):
        return      # the trainer's own resume check reports a broken checkpoint
    loaded = backbone.identity()
    if trained.get("hash") and trained.get("hash") != loaded.get("hash"):
        def label(identity):
            return identity.get("title") or Path(str(identity.get("source") or "?")).name
        raise CannotTrain(
            f"The run '{Path(cfg.run_dir).name}' was trained on {label(trained)} (fingerprint "
            f"{trained.get('hash')}), but the WebUI has {label(loaded)} loaded (fingerprint "
            f"{loaded.get('hash')}; the VAE and CLIP skip count too). Load the run's checkpoint "
            "in the checkpoint dropdown and resume again, or start a new run (Resume off or "
            "another output name).")


def prepare_config(cfg, env: WebuiEnv, backbone: WebuiBackbone):
    """What the WebUI decides for a job: outputs outside the Lora scan, precision of the loaded model."""
    check_run_dir(cfg.run_dir, env)
    changes: dict[str, object] = {}
    compute = backbone.compute_dtype
    if compute in (torch.float16, torch.bfloat16) and cfg.mixed_precision == "no":
        # the loaded weights are half precision and are trained in place (no fp32 copy)
        changes["mixed_precision"] = "fp16" if compute == torch.float16 else "bf16"
        log.info("the WebUI model is %s and computes in %s: training with mixed_precision %s",
                 backbone.dtype, compute, changes["mixed_precision"])
    elif compute != backbone.dtype:
        # Forge on the CPU: 16-bit storage, fp32 computation. Forge casts each weight as a layer
        # uses it, and autograd keeps every cast copy for backward: a whole fp32 copy of the UNet
        # by the end of the forward pass, unless the blocks recompute their activations.
        if not cfg.gradient_checkpointing:
            changes["gradient_checkpointing"] = True
        log.info("the WebUI model is %s and Forge computes in %s: training in place with mixed_precision "
                 "%s (the LoRA in fp32) and gradient checkpointing (no fp32 copies of the weights kept "
                 "for backward)", backbone.dtype, compute, cfg.mixed_precision)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def build_webui_config(values: dict, env: WebuiEnv):
    """A TrainConfig from the tab's values, completed with the WebUI's defaults (output and LoRA
    folders, preview settings, the loaded checkpoint as base_model). Relative paths are relative to
    the extension folder, so the default run_dir is `<extension>/runs/<output_name>`."""
    from ..app.run_config import run_config_from_dict
    from .guard import webui_rules

    rules = webui_rules(env)
    # the request's own values first: a refused path is never even tested for existence
    rules.check_values(values, extension_dir(), "<webui>")
    merged = dict(webui_defaults(env))
    if not Path(merged.get("lora_dir", "")).is_dir():
        merged.pop("lora_dir", None)
    merged.update({k: v for k, v in values.items() if v is not None})
    if not merged.get("base_model"):
        filename = getattr(getattr(env.sd_model, "sd_checkpoint_info", None), "filename", None)
        if filename and Path(filename).exists():
            merged["base_model"] = filename
    cfg = run_config_from_dict(merged, base_dir=extension_dir(), source="<webui>", required=("train_data_dir",))
    # the defaults too (run_dir = runs/<output_name>); reads here are the server's own choices
    rules.check_config(cfg, "<webui>", reads=False)
    return cfg


def webui_previewer(cfg, env: WebuiEnv):
    """Previews through the WebUI's own txt2img (process_images), when there are preview prompts
    and the WebUI's processing module is at hand; None otherwise (run_training then uses the
    project's own previewer on the WebUI backbone, if prompts are set). Without preview prompts
    but with write_card, one render at the end for the Lora card's thumbnail
    (preview.card_thumbnail)."""
    processing = env.processing
    if not hasattr(processing, "process_images") or not hasattr(processing, "StableDiffusionProcessingTxt2Img"):
        return None
    from .preview import WebuiPreviewer
    if cfg.preview_prompts:
        return WebuiPreviewer(cfg, env)
    if not cfg.write_card:
        return None
    from ..preview.card_thumbnail import CardThumbnail
    return CardThumbnail(cfg, lambda prompts: WebuiPreviewer(cfg, env, prompts=prompts))


# ---- the job --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _host_backbone(model, env: WebuiEnv, cfg):
    """The backbone over the loaded model, after the LoRAs of earlier generations are taken off.
    A1111: the Lora extension's merges undone (lora_state). Forge: its patchers' LoRA patches
    removed and, for the job, weights autograd can use (forge.py)."""
    if not env.is_forge:
        log.info("%s", clean_base_weights(model, env.networks).summary())
        yield WebuiBackbone(model, env=env, resolution=cfg.resolution)
        return
    from .forge import clean_forge_weights
    from .forge_backbone import ForgeBackbone

    log.info("%s", clean_forge_weights(model, env.memory_management).summary())
    backbone = ForgeBackbone(model, env=env, resolution=cfg.resolution,
                             memory_management=env.memory_management)
    backbone.settle()
    with backbone.autograd:
        yield backbone

class _RefreshWebuiLoras(TrainingObserver):
    """After every LoRA file write: the WebUI sees the new file, not cached copies of the old one."""

    def __init__(self, env: WebuiEnv):
        self.env = env
        self.saved: list[Path] = []

    def on_lora_saved(self, path) -> None:
        self.saved.append(Path(path))
        try:
            invalidate_webui_lora_caches(self.env, names=[Path(path).stem])
        except Exception:   # a stale card list must never fail a training run
            log.warning("could not refresh the WebUI's Lora list", exc_info=True)


@contextlib.contextmanager
def _console_logging():
    """The job's messages on the WebUI's console the way the CLI shows them: one line each, without
    the records meant for train.log only (the effective config, per-step lines); they would
    otherwise reach whatever handler the WebUI's root logger has."""
    logger = logging.getLogger("lora_trainer")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("lora_trainer: %(message)s"))
    handler.setLevel(logging.INFO)
    handler.addFilter(lambda record: not getattr(record, "file_only", False))
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


def _run_training():
    """`app.session.run_training`, without letting its import switch the whole WebUI process to
    offline mode (session.py sets HF_HUB_OFFLINE for headless runs)."""
    had = "HF_HUB_OFFLINE" in os.environ
    from ..app.session import run_training
    if not had:
        os.environ.pop("HF_HUB_OFFLINE", None)
    return run_training


def train_on_loaded_model(cfg, *, env: WebuiEnv | None = None, control: TrainingControl | None = None,
                          observers=(), previewer=None, force_resume: bool = False):
    """Train a LoRA on the WebUI's loaded model, in place. Call with the WebUI's queue lock held."""
    global _current_control
    if cfg.task_type != "sd":   # the tab trains the loaded Stable Diffusion model, nothing else
        raise CannotTrain(f"task_type {cfg.task_type} cannot train in the WebUI: the tab trains LoRAs on the "
                          "loaded Stable Diffusion model. Train a causal_lm config with `lora-trainer train "
                          "--config ...` or in the standalone `lora-trainer ui`.")
    env = env or WebuiEnv.current()
    check_can_train(env)
    with _console_logging():
        model = env.sd_model
        control = control or TrainingControl()
        run_training = _run_training()
        refresher = _RefreshWebuiLoras(env)
        progress = [WebuiProgress(control, env.state)] if env.state is not None else []
        _current_control = control
        try:
            with torch.inference_mode(False), _host_backbone(model, env, cfg) as backbone, \
                    ModelGuard(backbone.model) as guard, torch.enable_grad():
                check_resume_model(cfg, backbone)
                cfg = prepare_config(cfg, env, backbone)
                if previewer is None:
                    previewer = webui_previewer(cfg, env)
                try:
                    result = run_training(cfg, backbone, control, [*progress, refresher, *observers],
                                          previewer, force_resume)
                finally:
                    backbone.release()
            log.info("the WebUI model is as before training (weights digest %s)", guard.digest)
        finally:
            _current_control = None
        if refresher.saved:
            invalidate_webui_lora_caches(env, names=sorted({p.stem for p in refresher.saved}))
        return result


# ---- buttons --------------------------------------------------------------------------------------------

def request_stop(env: WebuiEnv | None = None) -> None:
    """The tab's Stop button: the same as the WebUI's Interrupt (clean stop with a checkpoint)."""
    if _current_control is not None:
        _current_control.request_stop("stopped from the Train LoRA tab")
    env = env or WebuiEnv.current()
    if env.state is not None:
        env.state.interrupt()


def request_save_now() -> bool:
    if _current_control is None:
        return False
    _current_control.save_now.set()
    return True


def request_preview_now() -> bool:
    if _current_control is None:
        return False
    _current_control.preview_now.set()
    return True


def is_training() -> bool:
    return _current_control is not None


def result_outputs(result) -> tuple[str, str]:
    """(status text, HTML): the WebUI appends its "Time taken" block to the last output, an HTML."""
    return result.message, f"<p>{html.escape(result.message)}</p>"


def make_train_handler(build_config, format_result=result_outputs, extra_outputs=None):
    """A gradio click handler for the tab's Train button.

    `build_config(*inputs)` turns the inputs after the task id into a TrainConfig (e.g. via
    `build_webui_config`). The first input must be the task id the tab's JavaScript sets with
    `randomId()` (see docs/webui.md); the handler holds the queue lock while it trains.
    """
    from modules import call_queue

    def train(id_task, *inputs):
        cfg = build_config(*inputs)
        return format_result(train_on_loaded_model(cfg))

    return call_queue.wrap_gradio_gpu_call(train, extra_outputs=extra_outputs if extra_outputs is not None
                                           else [""])


def train_from_json(config_json: str, env: WebuiEnv | None = None):
    """A job from a JSON object of TrainConfig keys (what the hidden API endpoint receives), plus
    `"force_resume": true` to continue a run whose forced-resume settings changed (the CLI's
    --force-resume)."""
    env = env or WebuiEnv.current()
    values = json.loads(config_json) if config_json.strip() else {}
    if not isinstance(values, dict):
        raise CannotTrain("the config must be a JSON object of TrainConfig keys")
    force_resume = bool(values.pop("force_resume", False))   # not a TrainConfig key: --force-resume
    return train_on_loaded_model(build_webui_config(values, env), env=env, force_resume=force_resume)


def make_json_train_handler():
    """Handler for a hidden button registered with `api_name="lora_trainer_train_json"`: inputs
    (task id, config JSON), outputs (result JSON, HTML). Scripts and tests/webui drive training
    through it."""
    from modules import call_queue

    def train(id_task, config_json):
        result = train_from_json(config_json)
        payload = {"status": result.status, "step": result.step, "total_steps": result.total_steps,
                   "lora_path": str(result.lora_path), "run_dir": str(result.run_dir),
                   "message": result.message}
        return json.dumps(payload), f"<p>{html.escape(result.message)}</p>"

    return call_queue.wrap_gradio_gpu_call(train, extra_outputs=[""])
