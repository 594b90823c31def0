"""A STAND-IN for the AUTOMATIC1111 WebUI's loaded SD1 model and its Lora extension, for CI.

Not WebUI code: it is built from the tiny SD1 single-file checkpoint loaded into diffusers modules,
re-hung under the LDM module names the WebUI's `shared.sd_model` has (derived from the
checkpoint's keys with our own `ldm_keys` map), and exposes the methods `WebuiBackbone` calls:
`get_learned_conditioning`, `encode_first_stage`, `get_first_stage_encoding`, `decode_first_stage`,
`apply_model`, `alphas_cumprod` (computed the LDM way: float64 then float32), `parameterization`,
`is_sd1/is_sd2/is_sdxl`, `sd_checkpoint_info` and `network_layer_mapping`.

`make_networks_standin` is a stand-in for the built-in Lora extension's `networks` module: it
merges a kohya file into the weights in place with per-layer backups and `network_current_names`,
the way the WebUI does at generation time, so the restore logic can be tested.

What it does NOT reproduce: the WebUI's prompt parsing (emphasis, chunking), its attention
optimisations, half precision and the class-level forward patches of the Lora extension.
"""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_trainer.backbones.diffusers_sd import load_backbone
from lora_trainer.backbones.ldm_keys import unet_ldm_module_name
from lora_trainer.lora.kohya_file import file_layers, read_lora_file
from lora_trainer.lora.kohya_names import webui_candidate_names

from kohya_reference import layer_delta


class _Node(nn.Module):
    """A plain container: only there so named_modules() spells LDM paths."""


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = _Node()
            node.add_module(part, child)
        node = child
    if leaf in node._modules:
        raise ValueError(f"two diffusers modules map to the LDM path {path}")
    node.add_module(leaf, module)


class LdmUNetStandIn(nn.Module):
    """`sd_model.model.diffusion_model`: the diffusers UNet's own layer objects, hung at their LDM
    paths (transformer blocks whole: their inner names are the same in both layouts). Forward runs
    the diffusers UNet, so an adapter on any of these layers takes effect."""

    def __init__(self, unet, unet_config: dict):
        super().__init__()
        placed: list[str] = []
        for path, module in unet.named_modules():
            if not path or any(path.startswith(p + ".") for p in placed):
                continue
            whole = type(module).__name__ == "BasicTransformerBlock"
            if not whole and not any(True for _ in module.parameters(recurse=False)):
                continue
            _place(self, unet_ldm_module_name(path, unet_config), module)
            if whole:
                placed.append(path)
        self.in_channels = unet_config["in_channels"]
        object.__setattr__(self, "_diffusers_unet", unet)   # not a registered child: names stay LDM

    def forward(self, x, timesteps=None, context=None, **kwargs):
        return self._diffusers_unet(x, timesteps, encoder_hidden_states=context).sample


class _DiffusionWrapper(nn.Module):
    conditioning_key = "crossattn"

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c_crossattn=None, **kwargs):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class _FrozenClipStandIn(nn.Module):
    """ldm's FrozenCLIPEmbedder: `.transformer` with the `text_model.` level transformers 4.30 has."""

    def __init__(self, text_encoder, tokenizer):
        super().__init__()
        self.transformer = _Node()
        self.transformer.add_module("text_model", text_encoder)
        self.tokenizer = tokenizer


class _HijackedClipStandIn(nn.Module):
    """sd_hijack's FrozenCLIPEmbedderWithCustomWords: `.wrapped`, called with a list of prompts.
    Plain tokenisation (pad with <end> to 77), no emphasis parsing."""

    def __init__(self, text_encoder, tokenizer):
        super().__init__()
        self.wrapped = _FrozenClipStandIn(text_encoder, tokenizer)

    def forward(self, texts):
        tok = self.wrapped.tokenizer
        ids = tok(list(texts), padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        return self.wrapped.transformer.text_model(ids)[0]


def ldm_alphas_cumprod(linear_start=0.00085, linear_end=0.012, steps=1000) -> torch.Tensor:
    """The LDM schedule: betas from a float64 linspace, cumprod in float64, stored as float32."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, steps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


class StandInSD1(nn.Module):
    """What `shared.sd_model` is for an SD1 checkpoint, after the WebUI's hijack (see module doc)."""

    is_sd1, is_sd2, is_sdxl, is_ssd, is_sd3 = True, False, False, False, False
    parameterization = "eps"
    lowvram = False

    def __init__(self, single_file: Path):
        super().__init__()
        parts = load_backbone(str(single_file))
        self.model = _DiffusionWrapper(LdmUNetStandIn(parts.unet, dict(parts.unet.config)))
        self.first_stage_model = parts.vae
        self.cond_stage_model = _HijackedClipStandIn(parts.text_encoder, parts.tokenizer)
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())
        self.alphas_cumprod_original = self.alphas_cumprod
        self.scale_factor = 0.18215
        self.sd_checkpoint_info = types.SimpleNamespace(
            filename=str(single_file), title=f"{Path(single_file).name} [standin]", sha256=None,
            shorthash=None, model_name=Path(single_file).stem)
        self.sd_model_hash = "standin"
        self.requires_grad_(True)            # as in the WebUI: parameters require grad
        self.eval()
        assign_network_names(self)

    # the methods the WebUI's LatentDiffusion offers
    def get_learned_conditioning(self, texts):
        return self.cond_stage_model(texts)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x).latent_dist   # a diagonal Gaussian (.mean, .std)

    def get_first_stage_encoding(self, encoder_posterior):
        z = encoder_posterior if isinstance(encoder_posterior, torch.Tensor) else encoder_posterior.sample()
        return self.scale_factor * z

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(1.0 / self.scale_factor * z).sample

    def apply_model(self, x_noisy, t, cond):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)


def assign_network_names(sd_model) -> None:
    """What the Lora extension does on model load: `network_layer_name` on every module of the text
    encoder (its `.wrapped`) and of `sd_model.model`, and the name -> module mapping."""
    mapping = {}
    te = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    for root in (te, sd_model.model):
        for name, module in root.named_modules():
            layer = name.replace(".", "_")
            mapping[layer] = module
            module.network_layer_name = layer
    sd_model.network_layer_mapping = mapping


# ---- the Lora extension --------------------------------------------------------------------------------

def make_networks_standin(sd_model):
    """Stand-in for extensions-builtin/Lora/networks.py: state lists, the restore-from-backup
    function, and `merge_file` doing what a generation with <lora:name:w> does to the weights."""
    mod = types.ModuleType("networks")
    mod.loaded_networks = []
    mod.networks_in_memory = {}
    mod.available_networks = {}
    mod.calls = []

    def list_available_networks():
        mod.calls.append("list_available_networks")

    def network_restore_weights_from_backup(module):
        weight = getattr(module, "network_weights_backup", None)
        bias = getattr(module, "network_bias_backup", None)
        if weight is None and bias is None:
            return
        if weight is not None:
            module.weight.copy_(weight)       # raises on a leaf that requires grad outside no_grad
        if bias is not None:
            module.bias.copy_(bias)

    def merge_file(path, multiplier: float):
        tensors, _ = read_lora_file(path)
        name = Path(path).stem
        mapping = sd_model.network_layer_mapping
        merged = 0
        with torch.no_grad():
            for layer, keys in file_layers(tensors).items():
                target = next((mapping[c] for c in webui_candidate_names(layer) if c in mapping), None)
                if target is None:
                    continue
                if getattr(target, "network_weights_backup", None) is None:
                    target.network_weights_backup = target.weight.detach().to("cpu", copy=True)
                    target.network_bias_backup = (target.bias.detach().to("cpu", copy=True)
                                                  if target.bias is not None else None)
                delta = layer_delta(keys, target.weight, multiplier)   # any type: the WebUI's rules
                target.weight += delta.to(target.weight.dtype)
                target.network_current_names = ((name, multiplier, multiplier, None),)
                merged += 1
        mod.loaded_networks.append(types.SimpleNamespace(name=name, te_multiplier=multiplier,
                                                         unet_multiplier=multiplier))
        return merged

    mod.list_available_networks = list_available_networks
    mod.network_restore_weights_from_backup = network_restore_weights_from_backup
    mod.merge_file = merge_file
    return mod


class StateStandIn(types.SimpleNamespace):
    """modules.shared.state's fields that the progress bar and the Interrupt button use."""

    def __init__(self):
        super().__init__(interrupted=False, stopping_generation=False, skipped=False, job="",
                         job_no=0, job_count=0, sampling_step=0, sampling_steps=0, textinfo=None,
                         history=[])

    def interrupt(self):
        self.interrupted = True


def processing_standin():
    cls = type("StableDiffusionProcessing", (), {"cached_c": ["stale", "c"], "cached_uc": ["stale", "uc"]})
    return types.SimpleNamespace(StableDiffusionProcessing=cls)


# ---- modules.processing's txt2img ------------------------------------------------------------------------


def processing_with_txt2img(sd_model, networks, lora_dir):
    """`processing_standin()` plus StableDiffusionProcessingTxt2Img / process_images: parses
    `<lora:name:w>`, merges those files from `lora_dir` the way the Lora extension does (restoring
    the previous merge first), renders one deterministic image from the model (noise from the
    global RNG seeded with p.seed, like the WebUI's CPU noise source) and records what it saw."""
    import re

    from PIL import Image

    mod = processing_standin()
    mod.seen = []
    tag = re.compile(r"<lora:([^:>]+):([-\d.]+)>")

    class StableDiffusionProcessingTxt2Img:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.closed = False

        def close(self):
            self.closed = True

    def process_images(p):
        from lora_trainer.lora import host

        with torch.no_grad():
            for module in sd_model.network_layer_mapping.values():
                if getattr(module, "network_current_names", ()):
                    networks.network_restore_weights_from_backup(module)
                    module.network_current_names = ()
            networks.loaded_networks.clear()
            mod.seen.append({"prompt": p.prompt, "grad": torch.is_grad_enabled(),
                             "adapters": sum(host.has_adapters(m) for m in sd_model.modules()),
                             "training": any(m.training for m in sd_model.modules()),
                             "args": {k: v for k, v in p.__dict__.items() if k != "sd_model"}, "p": p})
            for name, weight in tag.findall(p.prompt):
                networks.merge_file(Path(lora_dir) / f"{name}.safetensors", float(weight))
            text = tag.sub("", p.prompt).strip()
            cond = sd_model.get_learned_conditioning([text])
            torch.manual_seed(p.seed)
            noise = torch.randn(1, 4, p.height // 8, p.width // 8)
            eps = sd_model.apply_model(noise, torch.tensor([500]), cond)
            pixels = sd_model.decode_first_stage(noise - 0.5 * eps)[0]
            array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return types.SimpleNamespace(images=[Image.fromarray(array)],
                                     infotexts=[f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}"])

    mod.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    mod.process_images = process_images
    return mod


def standin_env(model, lora_dir: Path, networks=None, processing=None):
    """The WebuiEnv the WebUI would hand a job with `model` loaded and `lora_dir` as its Lora folder
    (`models_path` is the folder above it)."""
    from lora_trainer.webui.env import WebuiEnv

    lora_dir.mkdir(parents=True, exist_ok=True)
    return WebuiEnv(sd_model=model, state=StateStandIn(),
                    networks=networks if networks is not None else make_networks_standin(model),
                    processing=processing if processing is not None else processing_standin(),
                    cmd_opts=types.SimpleNamespace(lowvram=False, medvram=False, lora_dir=str(lora_dir)),
                    opts=types.SimpleNamespace(CLIP_stop_at_last_layers=1),
                    models_path=str(lora_dir.parent))


def txt2img_env(model, lora_dir: Path):
    """standin_env whose `processing` renders txt2img and applies `<lora:…>` from `lora_dir` the way
    the Lora extension does (for the WebUI previewers)."""
    networks = make_networks_standin(model)
    return standin_env(model, lora_dir, networks, processing_with_txt2img(model, networks, lora_dir))
