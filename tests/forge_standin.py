"""A STAND-IN for Stable Diffusion WebUI Forge's loaded SD1 model, for CI (not Forge code).

Built around the A1111 stand-in (tests/webui_standin.py: the tiny SD1 checkpoint's modules under
LDM paths), re-hung the way Forge's `ForgeDiffusionEngine` holds them, with the three things that
make Forge different for training:

- `forge_objects` / `forge_objects_original`: UNet, CLIP and VAE "patchers", each with a
  `LoraLoader` stand-in that, like Forge's, *replaces* a patched weight by a merged Parameter and
  keeps the original in `backup` until `refresh({})`;
- every weight an inference tensor (Forge builds the model under `torch.inference_mode()`), CLIP's
  token embedding registered twice, its position embedding in fp16 until the first text encoding;
- the UNet's Linear layers are not `nn.Linear` (Forge's `operations.Linear` is a plain Module), and
  its transformer blocks add into `x` in place after a norm saved it, as Forge's do.

`memory_management` stands in for Forge's `backend.memory_management.load_models_gpu`: a patcher
that is loaded gets its LoRA patches applied, loading the LoRA-free original takes them off.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from tests.webui_standin import StandInSD1


class ForgeLinear(nn.Module):
    """Forge's operations.Linear: an nn.Module (not nn.Linear) with weight, bias, in/out features."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _in_place_block_forward(b, x, *args, encoder_hidden_states=None, **kwargs):
    """Forge's BasicTransformerBlock: `x += attn1(norm1(x))` etc., into the block's own input."""
    x += b.attn1(b.norm1(x))
    x += b.attn2(b.norm2(x), encoder_hidden_states=encoder_hidden_states)
    skip = x
    x = b.ff(b.norm3(x))
    x += skip
    return x


_in_place_classes: dict[type, type] = {}


def _in_place_block_class(cls: type) -> type:
    """`cls` with Forge's in-place forward, under the same class name (what the backbone matches)."""
    if cls not in _in_place_classes:
        _in_place_classes[cls] = type(cls.__name__, (cls,), {"forward": _in_place_block_forward})
    return _in_place_classes[cls]


class LoraLoaderStandIn:
    def __init__(self, model: nn.Module):
        self.model, self.backup, self.online_backup, self.loaded_hash = model, {}, [], str([])

    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        if str(list(lora_patches)) == self.loaded_hash and not force_refresh:
            return
        for key, original in self.backup.items():
            _set_param(self.model, key, original)
        self.backup = {}
        with torch.inference_mode():
            for patches in lora_patches.values():
                for key, delta in patches.items():
                    weight = _get_param(self.model, key)
                    self.backup.setdefault(key, weight)
                    _set_param(self.model, key, nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = str(list(lora_patches))


def _get_param(model, key):
    *path, name = key.split(".")
    return getattr(model.get_submodule(".".join(path)), name)


def _set_param(model, key, value):
    *path, name = key.split(".")
    model.get_submodule(".".join(path))._parameters[name] = value


class PatcherStandIn:
    def __init__(self, model, lora_patches=None):
        self.model = model
        self.lora_patches = dict(lora_patches or {})
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoaderStandIn(model)
        self.lora_loader = model.lora_loader
        self.offload_device = torch.device("cpu")

    def clone(self):
        return PatcherStandIn(self.model, self.lora_patches)


class MemoryManagementStandIn:
    def __init__(self):
        self.loaded: list = []
        self.calls = 0

    def load_models_gpu(self, patchers, memory_required=0):
        self.calls += 1
        for patcher in patchers:
            if any(p is patcher for p in self.loaded):
                continue
            self.loaded = [p for p in self.loaded if p.model is not patcher.model] + [patcher]
            patcher.lora_loader.refresh(patcher.lora_patches)


class ForgeStandIn:
    """What Forge's `shared.sd_model` is for an SD1 checkpoint (see the module doc)."""

    is_sd1, is_sd2, is_sdxl, is_inpaint = True, False, False, False

    def __init__(self, single_file, storage_dtype=torch.float32):
        a1111 = StandInSD1(single_file)
        self.a1111 = a1111
        unet = a1111.model.diffusion_model
        for module in list(unet.modules()):
            if type(module).__name__ == "BasicTransformerBlock":
                module.__class__ = _in_place_block_class(type(module))
            if type(module) is nn.Linear:
                module.__class__ = ForgeLinear
        k_model = nn.Module()
        k_model.diffusion_model = unet
        k_model.predictor = types.SimpleNamespace(alphas_cumprod=a1111.alphas_cumprod, prediction_type="epsilon")
        k_model.storage_dtype = k_model.computation_dtype = storage_dtype
        clip_model = nn.Module()
        clip_model.clip_l = a1111.cond_stage_model.wrapped
        embeddings = {path.rsplit(".", 1)[-1]: m for path, m in clip_model.named_modules()
                      if path.endswith(("token_embedding", "position_embedding"))}
        # Forge's textual-inversion wrapper registers the token embedding's weight a second time
        clip_model.clip_l.token_weight_alias = embeddings["token_embedding"].weight
        # ...and its first text encoding converts the embeddings to fp32 (they load in fp16)
        self._position_embedding = embeddings["position_embedding"]
        self._position_embedding.half()
        vae_model = a1111.first_stage_model
        for module in (k_model, clip_model, vae_model):
            _make_inference_tensors(module)
        self.forge_objects_original = types.SimpleNamespace(
            unet=PatcherStandIn(k_model),
            clip=types.SimpleNamespace(patcher=PatcherStandIn(clip_model), cond_stage_model=clip_model),
            vae=types.SimpleNamespace(patcher=PatcherStandIn(vae_model), first_stage_model=vae_model))
        self.forge_objects = self.forge_objects_original
        self.forge_objects_after_applying_lora = self.forge_objects_original
        self.current_lora_hash = str([])
        self.sd_checkpoint_info = a1111.sd_checkpoint_info
        self.sd_model_hash = "forge-standin"
        self.clip_skip = 1

    def set_clip_skip(self, clip_skip):
        self.clip_skip = clip_skip

    def text_processing_engine(self, prompts):
        self._position_embedding.to(dtype=torch.float32)   # what encode_with_transformers does
        return self.a1111.get_learned_conditioning(prompts)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        return self.text_processing_engine(prompts)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.a1111.get_first_stage_encoding(self.a1111.encode_first_stage(x))

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self.a1111.decode_first_stage(z)

    def apply_lora(self, unet_patches: dict, name="x"):
        """What Forge's Lora extension does for `<lora:…>`: patched clones become the current parts."""
        unet = self.forge_objects_original.unet.clone()
        unet.lora_patches[(name, 1.0, 1.0, False)] = unet_patches
        self.forge_objects = types.SimpleNamespace(unet=unet, clip=self.forge_objects_original.clip,
                                                   vae=self.forge_objects_original.vae)
        self.forge_objects_after_applying_lora = self.forge_objects
        self.current_lora_hash = name


def _make_inference_tensors(module: nn.Module) -> None:
    with torch.inference_mode():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=True)
