"""The Backbone protocol over the model the WebUI already has loaded (`shared.sd_model`).

Nothing is reloaded or copied: the training loop calls the WebUI model's own methods
(`get_learned_conditioning` through the WebUI's hijacked text encoder, `encode_first_stage` /
`get_first_stage_encoding`, `apply_model`) and the LoRA adapters attach to its live layers by
replacing their instance `forward` (lora.host), so module names, `state_dict()` keys and the
Lora extension's per-layer bookkeeping never change. `ModelGuard` (lora_state) takes everything
off again.

Layer names come from the model itself: the UNet's LDM module paths under
`model.diffusion_model`, the text encoder(s) under `cond_stage_model.wrapped` (SD1/SD2) or
`conditioner.embedders[i].wrapped` (SDXL); `names` turns them into the kohya names of the file.

The families differ only in data (`names.LAYOUTS`); SD1, SDXL and SD2 (v-prediction) are tested
in the real WebUI (tests/webui), SD1 also against a stand-in (tests/test_webui_backbone.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contracts.backbone import DiffusionBackbone
from ..diffusion.families import family_row
from ..lora.kohya_names import webui_compvis_name
from ..lora.mha import mha_projections
from ..lora.targets import TEXT, LoraTarget, is_linear
from .names import (LAYOUTS, LayerName, NameTable, WebuiLayout, family_of, ldm_unet_role,
                    open_clip_attention_kohya_names, open_clip_layer_index, resolve_in_webui,
                    text_encoder_kohya_name, text_encoder_webui_name, unet_kohya_name, unet_webui_name)

log = logging.getLogger("lora_trainer")

# one CLIP chunk: <start> + 75 tokens + <end>; longer captions are cut to their first chunk, as the
# headless trainer (and kohya by default) does, so every cached conditioning has the same length
TOKENS_PER_CHUNK = 77

# LDM / SGM blocks whose activations are recomputed with gradient checkpointing on
CHECKPOINTED_BLOCKS = ("BasicTransformerBlock", "ResBlock")

_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def get_path(obj, path: str):
    """`get_path(m, "conditioner.embedders.0.wrapped")`; a missing final `.wrapped` falls back to its
    parent, the way the WebUI names an unhijacked text encoder."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        nxt = getattr(obj, part, None)   # also ModuleList items: their child names are "0", "1", ...
        if nxt is None and part == "wrapped" and i == len(parts) - 1:
            return obj
        if nxt is None:
            return None
        obj = nxt
    return obj


class _SizedPrompts(list):
    """Stand-in for the WebUI's prompt_parser.SdConditioning (a list with width/height) when that
    module is not available; SDXL's get_learned_conditioning only reads these attributes."""

    def __init__(self, prompts, width=None, height=None):
        super().__init__(prompts)
        self.width, self.height, self.is_negative_prompt = width, height, False


class _CheckpointedForward:
    """Instance `forward` of a UNet block that recomputes its activations in backward. With
    `copy_input`, the block runs on a copy of its input `x`: the checkpoint keeps `x` for the
    recomputation, and a block that adds into `x` in place (Forge's) would change it."""

    def __init__(self, forward, copy_input: bool = False):
        self.forward = forward
        self.copy_input = copy_input

    def _run(self, x, *args, **kwargs):
        return self.forward(x.clone(), *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        run = self._run if self.copy_input and args and torch.is_tensor(args[0]) else self.forward
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _first_param(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    raise ValueError(f"{type(module).__name__} has no parameters")


def compute_device(env, weight: torch.Tensor) -> torch.device:
    """Where the WebUI runs the model: its own device (`modules.devices.device`), not where a weight
    lies now. With --medvram the WebUI parks the UNet, VAE and text encoders on the CPU between uses
    and its forward hooks move each one to the GPU when it is called; inputs and LoRA adapters must
    be on the GPU by then. Without a WebUI (stand-ins) the weight's device is all there is."""
    device = getattr(getattr(env, "devices", None), "device", None)
    return torch.device(device) if device is not None else weight.device


class WebuiBackbone(DiffusionBackbone):
    def __init__(self, sd_model, env=None, resolution: int = 512):
        self.model = sd_model
        self.env = env
        self.layout = self.layout_of(sd_model)
        self.unet = get_path(sd_model, self.layout.unet_root)
        if self.unet is None:
            raise ValueError("the loaded model has no model.diffusion_model (is this Forge? only "
                             "AUTOMATIC1111's model objects are supported)")
        weight = _first_param(self.unet)
        self.device = compute_device(env, weight)
        self.dtype = weight.dtype
        # what the model computes in; mixed precision follows it (Forge may store 16-bit weights
        # and compute in fp32: it casts each weight as it uses it)
        self.compute_dtype = self.dtype
        parameterization = getattr(sd_model, "parameterization", "eps")
        if parameterization not in _PREDICTION_TYPES:
            raise ValueError(f"the loaded model predicts '{parameterization}'; only eps and v are supported")
        self.prediction_type = _PREDICTION_TYPES[parameterization]
        self.family = family_row(self.layout.family, self.prediction_type)
        # the model's own schedule, not a per-generation override (fp16 downcast, zero terminal SNR)
        # that processing.py may have left in alphas_cumprod
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        if schedule is None:
            schedule = sd_model.alphas_cumprod
        self.alphas_cumprod = schedule.detach().to("cpu", torch.float32).clone()
        self.resolution = resolution
        self.conditioning_uses_sizes = self.family.conditioning_uses_sizes
        self._checkpointed: list[nn.Module] = []
        self._identity: dict | None = None
        self._names: NameTable | None = None
        self._modules: dict[str, nn.Module] = {}
        self._truncated_captions = 0

    # warn about text-encoder keys A1111's Lora extension would not find (Forge has its own loader)
    reports_webui_lookup = True
    # the UNet's blocks add into their input in place (Forge's): checkpointing gives them a copy
    blocks_modify_their_input = False

    @staticmethod
    def layout_of(sd_model) -> WebuiLayout:
        """Where the model's parts sit and how their layers are named (names.LAYOUTS)."""
        return LAYOUTS[family_of(sd_model)]

    # ---- identity / settings -----------------------------------------------------------------------
    def _clip_skip(self) -> int:
        return int(self.env.option("CLIP_stop_at_last_layers", 1)) if self.env is not None else 1

    def identity(self) -> dict[str, Any]:
        """Fingerprint of the loaded weights. `hash` uses the same cheap file fingerprint as the
        headless backbone (so a run, its latent cache and its resume check carry over between the
        CLI and the WebUI); the VAE file and a non-default CLIP skip fold into it because they change
        the latents / conditioning. The WebUI's own sha256/title are recorded alongside."""
        if self._identity is None:
            from ..backbones.diffusers_sd import fingerprint_file

            info = getattr(self.model, "sd_checkpoint_info", None)
            filename = getattr(info, "filename", None)
            if filename and Path(filename).is_file():
                base = fingerprint_file(Path(filename))
            else:
                base = (getattr(info, "sha256", None) or getattr(info, "shorthash", None)
                        or getattr(self.model, "sd_model_hash", None) or "unknown")
            parts = [base]
            vae = getattr(self.model, "loaded_vae_file", None)
            if vae and Path(vae).is_file():
                parts.append("vae:" + fingerprint_file(Path(vae)))
            clip_skip = self._clip_skip()
            if clip_skip != 1:
                parts.append(f"clip_skip:{clip_skip}")
            digest = base if len(parts) == 1 else hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
            self._identity = {
                "family": self.family.name, "source": filename or getattr(info, "title", "webui model"),
                "hash": digest, "prediction_type": self.prediction_type, "host": "webui",
                "title": getattr(info, "title", None), "sha256": getattr(info, "sha256", None),
                "shorthash": getattr(info, "shorthash", None), "vae": vae, "clip_skip": clip_skip,
            }
        return dict(self._identity)

    def runtime_settings(self) -> dict[str, Any]:
        hijack = getattr(getattr(self.env, "sd_hijack", None), "model_hijack", None)
        return {"attention": getattr(hijack, "optimization_method", None) or "webui default",
                "dtype": str(self.dtype), "device": self.device.type, "host": "webui",
                "clip_skip": self._clip_skip()}

    # ---- training state --------------------------------------------------------------------------------
    def freeze(self) -> None:
        """requires_grad_(False) on every base weight (ModelGuard gives the flags back afterwards)."""
        for p in self.model.parameters():
            p.requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled and not self._checkpointed:
            for m in self.unet.modules():
                if type(m).__name__ in CHECKPOINTED_BLOCKS and "forward" not in m.__dict__:
                    m.forward = _CheckpointedForward(m.forward, copy_input=self.blocks_modify_their_input)
                    self._checkpointed.append(m)
        elif not enabled:
            for m in self._checkpointed:
                if isinstance(m.__dict__.get("forward"), _CheckpointedForward):
                    del m.__dict__["forward"]
            self._checkpointed.clear()

    def compile_training_step(self, backend: str = "inductor") -> None:
        raise ValueError("compile: true is headless only: the WebUI's loaded model also serves its "
                         "generations, and a compiled copy of its step would recompile for minutes "
                         "whenever the WebUI changes the model. Set compile: false here, or train "
                         "headless (lora-trainer train) to use it")

    def release(self) -> None:
        """Undo what this backbone changed on the model (gradient checkpointing)."""
        self.set_gradient_checkpointing(False)

    # ---- encoding / prediction --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _rng_from(self, generator: torch.Generator):
        """Global RNG seeded from `generator` (for VAEs that sample internally), restored afterwards."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(generator.initial_seed())
            yield

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = getattr(self.model, "first_stage_model", None)
        dtype = _first_param(vae).dtype if vae is not None else self.dtype
        x = pixels.to(self.device, dtype)
        with self._rng_from(generator):
            posterior = self.model.encode_first_stage(x)
        if isinstance(posterior, torch.Tensor):   # SDXL: already sampled (from the seeded RNG) and scaled
            z = posterior
        else:                                     # LDM: a diagonal Gaussian; sample it with `generator`
            mean, std = posterior.mean, posterior.std
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            z = mean + std * noise
        return self.model.get_first_stage_encoding(z).float()

    def _prompts(self, captions, width, height):
        parser = getattr(self.env, "prompt_parser", None)
        cls = getattr(parser, "SdConditioning", None)
        if cls is not None:
            return cls(list(captions), width=width, height=height)
        return _SizedPrompts(captions, width=width, height=height)

    def _first_chunk(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[1] > TOKENS_PER_CHUNK:
            self._truncated_captions += 1
            if self._truncated_captions == 1:
                log.warning("a caption is longer than 75 tokens: only its first 75 tokens are trained "
                            "(as the headless trainer and kohya do)")
            cond = cond[:, :TOKENS_PER_CHUNK]
        return cond

    def encode_text(self, captions, sizes=None) -> dict[str, torch.Tensor]:
        captions = list(captions)
        if not self.conditioning_uses_sizes:
            cond = self.model.get_learned_conditioning(captions)
            if isinstance(cond, dict):
                cond = cond["crossattn"]
            return {"crossattn": self._first_chunk(cond)}
        # SDXL: the `vector` part encodes the image size; one call per distinct size
        targets = [tuple((s or {}).get("target") or (self.resolution, self.resolution))
                   for s in (sizes or [None] * len(captions))]
        out: dict[str, list] = {}
        order = []
        for size in dict.fromkeys(targets):
            idx = [i for i, t in enumerate(targets) if t == size]
            height, width = size
            with self._text_embedders_record_gradients():
                cond = self.model.get_learned_conditioning(
                    self._prompts([captions[i] for i in idx], width=width, height=height))
            for key, value in cond.items():
                out.setdefault(key, []).append(value if key != "crossattn" else self._first_chunk(value))
            order.extend(idx)
        inverse = torch.argsort(torch.tensor(order))
        return {k: torch.cat(v)[inverse.to(v[0].device)] for k, v in out.items()}

    @contextlib.contextmanager
    def _text_embedders_record_gradients(self):
        """SGM's GeneralConditioner (SDXL) runs every embedder whose `is_trainable` is False -- all
        of them in an inference config -- under `torch.no_grad()`, so text-encoder LoRA layers would
        never get a gradient. While autograd is recording, the text embedders are marked trainable
        (their weights stay frozen: only the adapters require grad); put back afterwards."""
        changed = []
        if torch.is_grad_enabled():
            for encoder in self.layout.text_encoders:
                path = encoder.root[:-len(".wrapped")] if encoder.root.endswith(".wrapped") else encoder.root
                embedder = get_path(self.model, path)
                if embedder is not None and getattr(embedder, "is_trainable", None) is False:
                    embedder.is_trainable = True
                    changed.append(embedder)
        try:
            yield
        finally:
            for embedder in changed:
                embedder.is_trainable = False

    def predict(self, noisy_latents, timesteps, cond) -> torch.Tensor:
        x = noisy_latents.to(self.device, self.dtype)
        t = timesteps.to(self.device)
        if self.conditioning_uses_sizes:
            c = {k: v.to(self.device, self.dtype) for k, v in cond.items()}
        else:
            c = cond["crossattn"].to(self.device, self.dtype)
        with self._half_precision_autocast():
            return self.model.apply_model(x, t, c)

    def _half_precision_autocast(self):
        """fp16/bf16 LDM weights need autocast (their time embedding is computed in fp32)."""
        if self.compute_dtype == torch.float32 or self.device.type != "cuda":
            return contextlib.nullcontext()
        try:
            enabled = torch.is_autocast_enabled(self.device.type)
        except TypeError:   # older torch: no device argument
            enabled = torch.is_autocast_enabled()
        return contextlib.nullcontext() if enabled else torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = getattr(self.model, "first_stage_model", None)
        dtype = _first_param(vae).dtype if vae is not None else self.dtype
        images = self.model.decode_first_stage(latents.to(self.device, dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---- LoRA targets -----------------------------------------------------------------------------------
    def _text_encoder_roots(self):
        for encoder in self.layout.text_encoders:
            root = get_path(self.model, encoder.root)
            if root is None:
                log.warning("text encoder %s not found at %s: it will not get LoRA layers",
                            encoder.component, encoder.root)
                continue
            yield encoder, root

    def webui_layer_names(self) -> set[str]:
        """The names the WebUI gives every layer (what assign_network_names_to_compvis_modules
        computes): what a LoRA file's keys are resolved against."""
        names = {unet_webui_name(path) for path, _ in self.unet.named_modules() if path}
        for encoder, root in self._text_encoder_roots():
            names.update(text_encoder_webui_name(path, encoder) for path, _ in root.named_modules() if path)
        return names

    def name_table(self) -> NameTable:
        if self._names is None:
            layers = self._collect_layers()
            self._names = NameTable([layer for layer, _ in layers])
            self._modules = {layer.kohya: module for layer, module in layers}
        return self._names

    def _collect_layers(self) -> list[tuple[LayerName, nn.Module]]:
        webui_names = self.webui_layer_names()
        layers, misfits = [], []
        for path, module in self.unet.named_modules():
            role = ldm_unet_role(path, module)
            if role is None:
                continue
            webui = unet_webui_name(path)
            try:
                kohya = unet_kohya_name(path, self.layout)
            except ValueError:
                kohya = None
            if kohya is None or resolve_in_webui(kohya, webui_names, self.layout) != webui:
                # not in the SD1 block layout the diffusers-style names assume: kohya's LDM-style
                # name, which the WebUI, Forge and ComfyUI also load
                native = "lora_unet_" + path.replace(".", "_")
                misfits.append(path)
                kohya = native
            layers.append((LayerName(kohya, f"{self.layout.unet_root}.{path}", webui, "unet", role), module))
        if misfits:
            log.warning("%d UNet layers do not fit the SD1 block layout (e.g. %s): they are saved under "
                        "LDM-style kohya names", len(misfits), misfits[0])
        unresolved: list[str] = []
        for encoder, root in self._text_encoder_roots():
            run_layers = self._run_text_layers(encoder, root)
            for path, module in root.named_modules():
                if isinstance(module, nn.MultiheadAttention):
                    layers.extend(self._attention_layers(encoder, path, module, run_layers, webui_names,
                                                         unresolved))
                    continue
                if not is_linear(module):
                    continue
                kohya = text_encoder_kohya_name(path, encoder)
                if kohya is None:
                    continue
                if _never_run(path, run_layers):
                    continue   # SD2's last resblock: no gradient, not a kohya layer
                webui = text_encoder_webui_name(path, encoder)
                if resolve_in_webui(kohya, webui_names, self.layout) != webui:
                    unresolved.append(kohya)
                layers.append((LayerName(kohya, f"{encoder.root}.{path}", webui, encoder.component, TEXT),
                               module))
        if unresolved and self.reports_webui_lookup:
            log.warning("%d text-encoder layers would not be found by this WebUI under their kohya names "
                        "(e.g. %s); other tools load them", len(unresolved), unresolved[0])
        return layers

    def _attention_layers(self, encoder, path, module, run_layers, webui_names, unresolved):
        """The q/k/v/out projections of an OpenCLIP resblock's MultiheadAttention (lora.mha) as four
        layers, if the WebUI applies them: it finds q/k/v on the attention itself, out on its
        `out_proj` child, and adds all four into the attention's weights under the converted names."""
        kohya_names = open_clip_attention_kohya_names(path, encoder)
        if kohya_names is None or getattr(module, "in_proj_weight", None) is None:
            return []
        if _never_run(path, run_layers):
            return []   # SD2's last resblock
        attention = text_encoder_webui_name(path, encoder)
        layers = []
        for projection in mha_projections(module):
            kohya = kohya_names[projection.slot]
            webui = f"{attention}_{projection.slot}_proj"
            lands_on = attention + ("_out_proj" if projection.slot == "out" else "")
            if (resolve_in_webui(kohya, webui_names, self.layout) != lands_on
                    or webui_compvis_name(kohya, self.layout.webui_is_sd2) != webui):
                unresolved.append(kohya)
            layers.append((LayerName(kohya, f"{encoder.root}.{path}.{projection.slot}_proj", webui,
                                     encoder.component, TEXT), projection))
        return layers

    @staticmethod
    def _run_text_layers(encoder, root) -> int | None:
        """How many resblocks an encoder that stops at its `layer_idx` runs (None: all of them)."""
        if not encoder.stops_at_layer_idx:
            return None
        resblocks = get_path(root, "model.transformer.resblocks")
        if resblocks is None:
            return None
        return len(resblocks) - int(getattr(root, "layer_idx", 0) or 0)

    def lora_targets(self) -> list[LoraTarget]:
        """Every LoRA-able layer of the loaded model, in kohya-name order."""
        table = self.name_table()
        return [LoraTarget(layer.kohya, self._modules[layer.kohya], layer.component, layer.role)
                for layer in table.layers]


def _never_run(path: str, run_layers: int | None) -> bool:
    """Whether an OpenCLIP text-encoder layer lies in a resblock past the `run_layers` the encoder
    runs (None: it runs them all)."""
    index = open_clip_layer_index(path)
    return run_layers is not None and index is not None and index >= run_layers
