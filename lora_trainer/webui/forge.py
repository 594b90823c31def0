"""The Forge host: what differs when the WebUI is Stable Diffusion WebUI Forge.

Forge keeps A1111's `modules` (shared.state, the queue lock, processing, the Lora cards) but its
model is its own (`backend/`): `shared.sd_model` is a `ForgeDiffusionEngine` whose
`forge_objects` hold model patchers around the UNet (`unet.model.diffusion_model`, LDM module
paths), the text encoder(s) (`clip.cond_stage_model.clip_l`, transformers CLIP) and the VAE. What
this module does about each difference:

- Loading. Forge loads the checkpoint chosen in the dropdown lazily, at the first generation
  (`sd_models.forge_model_reload`, as processing.py does); a job calls the same function.
- LoRAs of generations. Forge's Lora extension does not merge into the layers like A1111's: it
  gives a *clone* of the UNet/CLIP patcher a set of `lora_patches`; when the memory manager loads
  that clone, its `LoraLoader` (one per model) replaces each patched weight by a merged one and
  keeps the original in `backup`. `clean_forge_weights` loads the LoRA-free patchers
  (`forge_objects_original`) the way processing does and refreshes their loaders with no patches,
  which puts every backed-up original back; then it checks no backup or online LoRA is left.
- Inference tensors. `forge_model_reload` builds the model under `torch.inference_mode()`, so
  every weight is an inference tensor, which autograd refuses to save for backward even when it is
  frozen. `AutogradWeights` swaps each parameter for a normal one with the same values for the
  job, one tensor at a time (never a second copy of the model), and back to inference tensors
  afterwards.
- Layers. Forge's `Linear` is its own `nn.Module` (not an `nn.Linear`) with the same
  `in_features` / `out_features` / `weight`; `lora.targets.is_linear` accepts it.
- FP8 / GGUF / NF4 storage (Forge's "Diffusion in Low Bits") cannot be trained: refused with the fix.

Everything is duck-typed on the model object, so tests run it against a stand-in (tests/forge_standin.py).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .env import refresh_lora_cards

log = logging.getLogger("lora_trainer")

_FLOAT8 = {d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d}
TRAINABLE_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


def running_in_forge() -> bool:
    """Forge's own packages (`modules_forge`, `backend`) are importable next to `modules`."""
    if "modules_forge" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def is_forge_model(sd_model) -> bool:
    return getattr(sd_model, "forge_objects", None) is not None


def forge_loaded_model():
    """The model of the checkpoint selected in Forge, loaded if it is not yet (Forge loads lazily,
    at the first generation, through this same call)."""
    from modules import sd_models

    model, _ = sd_models.forge_model_reload()
    return model


# ---- the model's parts as one module -------------------------------------------------------------------

def _holder(**children) -> nn.Module:
    holder = nn.Module()
    for name, child in children.items():
        setattr(holder, name, child)
    return holder


def forge_parts(sd_model):
    """(unet patcher, clip, vae) without the LoRA patches of the last generation."""
    objects = getattr(sd_model, "forge_objects_original", None) or sd_model.forge_objects
    return objects.unet, objects.clip, objects.vae


TRAINABLE_FAMILIES = ("sd1", "sdxl")


def model_view(sd_model) -> nn.Module:
    """Forge's modules under the attribute paths of A1111's LDM / SGM model, so the WebUI
    backbone's layer naming (names.py) applies: `model.diffusion_model` (the UNet, LDM paths),
    `cond_stage_model.wrapped` (SD1's CLIP-L: `transformer.text_model…`) or
    `conditioner.embedders.{0,1}.wrapped` (SDXL's CLIP-L and CLIP-G, both transformers CLIP in
    Forge), `first_stage_model` (VAE). Only references: the modules stay where Forge keeps them.
    `get_learned_conditioning` is Forge's own, without its inference mode (`forge_conditioning`)."""
    family = trainable_family(sd_model)
    unet, clip, vae = forge_parts(sd_model)
    encoders = clip.cond_stage_model
    if family == "sdxl":
        text = {"conditioner": _holder(embedders=nn.ModuleList([_holder(wrapped=encoders.clip_l),
                                                                _holder(wrapped=encoders.clip_g)]))}
    else:
        text = {"cond_stage_model": _holder(wrapped=encoders.clip_l)}
    # Any: the view also carries the WebUI model's plain attributes (flags, checkpoint info), which
    # nn.Module's typed __setattr__ does not know
    view: Any = _holder(model=_holder(diffusion_model=unet.model.diffusion_model),
                        first_stage_model=vae.first_stage_model, **text)
    setattr(view, f"is_{family}", True)
    view.get_learned_conditioning = lambda prompts: forge_conditioning(sd_model, prompts)
    view.sd_checkpoint_info = getattr(sd_model, "sd_checkpoint_info", None)
    view.sd_model_hash = getattr(sd_model, "sd_model_hash", None)
    predictor = unet.model.predictor
    view.alphas_cumprod = predictor.alphas_cumprod
    view.parameterization = "v" if getattr(predictor, "prediction_type", "epsilon") == "v_prediction" else "eps"
    return view


def forge_conditioning(sd_model, prompts):
    """Forge's `get_learned_conditioning` (its prompt parser, emphasis, embeddings, CLIP skip; for
    SDXL the pooled output and size embedding) without the `torch.inference_mode()` it is wrapped
    in, so text-encoder LoRA layers get gradients. It loads `forge_objects.clip`, which
    `clean_forge_weights` has set to the LoRA-free original."""
    method = type(sd_model).get_learned_conditioning
    unwrapped = getattr(method, "__wrapped__", None)
    if unwrapped is None:
        raise CannotTrainOnForge("This Forge's get_learned_conditioning is not the inference-mode-wrapped "
                                 "function this trainer knows (no __wrapped__); this Forge version is not "
                                 "supported for training. Use Forge at commit dfdcbab6 (docs/forge.md).")
    cond = unwrapped(sd_model, prompts)
    if isinstance(cond, dict):   # under an outer inference_mode (never in a job): usable as data only
        return {k: v.clone() if v.is_inference() else v for k, v in cond.items()}
    return cond.clone() if cond.is_inference() else cond


def forge_layout(family: str):
    """The WebUI layout of `family` as Forge holds it: Forge converts OpenCLIP text encoders (SDXL's
    second) to transformers' CLIPTextModel when it loads a checkpoint, so every text encoder is named
    the transformers way (`transformer.text_model.encoder.layers.N.self_attn.q_proj`) — the kohya
    names (`lora_te2_text_model_encoder_layers_N_…`) are the same as from A1111's OpenCLIP."""
    import dataclasses

    from ..diffusion.families import OPENAI_CLIP
    from .names import LAYOUTS

    layout = LAYOUTS[family]
    encoders = tuple(dataclasses.replace(e, clip_kind=OPENAI_CLIP) for e in layout.text_encoders)
    return dataclasses.replace(layout, text_encoders=encoders)


def trainable_family(sd_model) -> str:
    family = forge_family(sd_model)
    if family not in TRAINABLE_FAMILIES:
        raise CannotTrainOnForge(f"Training in Forge supports SD1 and SDXL checkpoints so far; the loaded model "
                                 f"is {family.upper()}. Train it with the headless trainer (lora-trainer "
                                 "train) or in AUTOMATIC1111's WebUI.")
    return family


def forge_family(sd_model) -> str:
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, flag, False):
            return family
    return type(sd_model).__name__


class CannotTrainOnForge(RuntimeError):
    """A refusal with a message meant for the user."""


def check_can_train_forge(sd_model) -> None:
    if sd_model is None or not is_forge_model(sd_model):
        raise CannotTrainOnForge("No Stable Diffusion model is loaded in Forge; pick a checkpoint first.")
    if getattr(sd_model, "is_inpaint", False):
        raise CannotTrainOnForge("The loaded model is an inpainting model; load a regular checkpoint to "
                                 "train a LoRA.")
    unet, clip, _ = forge_parts(sd_model)
    storage = getattr(unet.model, "storage_dtype", None)
    low_bits = storage in _FLOAT8 or (storage is not None and storage not in TRAINABLE_STORAGE)
    if low_bits or _any_quantised(unet.model.diffusion_model) or _any_quantised(clip.cond_stage_model):
        raise CannotTrainOnForge(
            f"Forge keeps this model's weights in {storage} (FP8, GGUF or NF4 storage), which cannot be "
            "trained. Set 'Diffusion in Low Bits' (top of the page) to 'Automatic' or 'Automatic (fp16 "
            "LoRA)' with a fp16/bf16/fp32 checkpoint and start without --unet-in-fp8-e4m3fn / "
            "--unet-in-fp8-e5m2 / --clip-in-fp8-*, then train again.")
    trainable_family(sd_model)


def _any_quantised(module: nn.Module) -> bool:
    for p in module.parameters():
        if p.dtype in _FLOAT8 or getattr(p, "gguf_cls", None) is not None or hasattr(p, "bnb_quantized"):
            return True
    return False


# ---- LoRA patches of earlier generations ----------------------------------------------------------------

@dataclass
class ForgeCleanReport:
    restored: list[str] = field(default_factory=list)     # the models whose loader had patches merged

    def summary(self) -> str:
        if not self.restored:
            return "no LoRA of an earlier generation was merged into the Forge model"
        return "restored the Forge model's own weights (LoRA patches removed from " + ", ".join(self.restored) + ")"


def _patchers(sd_model):
    unet, clip, vae = forge_parts(sd_model)
    return {"unet": unet, "text encoder": clip.patcher, "vae": vae.patcher}


def clean_forge_weights(sd_model, memory_management=None) -> ForgeCleanReport:
    """Load the LoRA-free patchers like a generation without `<lora:…>` would and refresh their
    LoRA loaders with no patches: every weight a LoRA replaced gets its original back. Then no
    backup and no online LoRA may be left. `memory_management` is Forge's backend module (None:
    imported; stand-ins pass their own)."""
    if memory_management is None:
        from backend import memory_management as forge_memory_management
        memory_management = forge_memory_management
    report = ForgeCleanReport()
    patchers = _patchers(sd_model)
    report.restored = [label for label, patcher in patchers.items()
                       if getattr(patcher, "lora_loader", None) is not None
                       and (patcher.lora_loader.backup or patcher.lora_loader.online_backup)]
    memory_management.load_models_gpu(list(patchers.values()))
    problems = []
    for label, patcher in patchers.items():
        loader = getattr(patcher, "lora_loader", None)
        if loader is None:
            continue
        loader.refresh({}, offload_device=getattr(patcher, "offload_device", torch.device("cpu")),
                       force_refresh=True)
        if loader.backup or loader.online_backup:
            problems.append(f"{label}: {len(loader.backup)} weights still patched")
        online = [m for m in patcher.model.modules() if getattr(m, "forge_online_loras", None)]
        if online:
            problems.append(f"{label}: {len(online)} layers still have an online LoRA")
    if problems:
        raise CannotTrainOnForge("Forge's LoRA patches could not be taken off the model (" + "; ".join(problems)
                                 + "). Reload the checkpoint (pick another one and back) and try again.")
    forget_applied_loras(sd_model)
    return report


def forget_applied_loras(sd_model) -> None:
    """Put Forge's Lora bookkeeping in its just-loaded state: no LoRA applied. Its Lora extension
    skips re-patching when a generation's LoRA list equals `current_lora_hash` and then reuses
    `forge_objects_after_applying_lora`; so that hash and those objects must go back together (a
    hash of "no LoRA" with the patched clones of an earlier `<lora:…>` left would render that LoRA
    into the next generation without one)."""
    originals = sd_model.forge_objects_original
    sd_model.forge_objects = copy.copy(originals)
    sd_model.forge_objects_after_applying_lora = copy.copy(originals)
    sd_model.current_lora_hash = str([])


def invalidate_forge_lora_caches(env, names=()) -> list[str]:
    """After writing LoRA files: Forge rereads them at the next `<lora:…>`. Its Lora extension
    caches file contents by path (`load_lora_state_dict`) and skips re-patching while the list of
    (file, weights) it applied is unchanged, even when a file's content changed."""
    done = []
    networks = env.networks
    loader = getattr(networks, "load_lora_state_dict", None)
    if loader is not None and hasattr(loader, "cache_clear"):
        loader.cache_clear()
        done.append("dropped Forge's LoRA file cache")
    if env.sd_model is not None and is_forge_model(env.sd_model):
        forget_applied_loras(env.sd_model)
    refreshed = refresh_lora_cards(env, networks)
    if refreshed:
        done.append(refreshed)
    cls = getattr(env.processing, "StableDiffusionProcessing", None) if env.processing is not None else None
    if cls is not None:
        cls.cached_c = [None, None]
        cls.cached_uc = [None, None]
        done.append("cleared the conditioning cache")
    return done


# ---- weights autograd can use ----------------------------------------------------------------------------

def _swap_parameters(module: nn.Module, inference: bool) -> int:
    """Replace every parameter that is (not) an inference tensor by an equal one that is not (is).
    One tensor at a time: the old one is freed as soon as nothing refers to it. A parameter
    registered twice (Forge's textual-inversion wrapper registers CLIP's token embedding as its own
    `weight` too) gets one replacement, so it stays shared."""
    replacements: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or (id(p) not in replacements and p.is_inference() == inference):
                continue
            if id(p) not in replacements:
                with torch.inference_mode(inference):
                    replacements[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            sub._parameters[name] = replacements[id(p)]
    return len(replacements)


class AutogradWeights:
    """`with AutogradWeights(view):` the model's weights are ordinary tensors (autograd can save
    them for backward); afterwards inference tensors again, as Forge made them. `refresh()` after
    anything that may have put inference tensors back (a preview's LoRA patching)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.swapped = 0

    def refresh(self) -> int:
        count = _swap_parameters(self.module, inference=False)
        self.swapped += count
        return count

    def __enter__(self):
        self.refresh()
        return self

    def __exit__(self, *exc):
        if self.swapped:
            _swap_parameters(self.module, inference=True)


@contextlib.contextmanager
def autograd_weights(module: nn.Module):
    with AutogradWeights(module) as weights:
        yield weights
