"""Which layers get an adapter: data, not code per model family.

A backbone lists every LoRA-able layer once as a `LoraTarget` (kohya name, module, component, role);
a preset is just the set of roles it trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .host import LinearSlot

# role of a layer inside the UNet
ATTENTION = "attn"          # to_q / to_k / to_v / to_out.0
FEED_FORWARD = "ff"         # ff.net.0.proj / ff.net.2
PROJECTION = "proj"         # proj_in / proj_out of a transformer block
RESNET = "resnet"           # conv1 / conv2 / conv_shortcut / time_emb_proj
SAMPLER = "sampler"         # down/up-sampler convolutions
TEXT = "text"               # any text-encoder Linear

TEXT_ENCODER_COMPONENTS = ("te", "te1", "te2")
UNET_PRESETS = {
    "attn": {ATTENTION},
    "attn-mlp": {ATTENTION, FEED_FORWARD, PROJECTION},
    "locon": {ATTENTION, FEED_FORWARD, PROJECTION, RESNET, SAMPLER},
}


def is_linear(module) -> bool:
    """An `nn.Linear`, or a layer that is one in all but class: Forge's `operations.Linear` is a
    plain `nn.Module` with `in_features`, `out_features` and a 2-D `weight`, applied as x W^T + b."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Module) and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and isinstance(getattr(module, "in_features", None), int)
            and tuple(weight.shape) == (module.out_features, module.in_features))


def transformer_block_role(path: str) -> str | None:
    """Role of a layer inside a transformer block: the same names in diffusers and LDM/SGM UNets."""
    if path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
        return ATTENTION
    if path.endswith(("ff.net.0.proj", "ff.net.2")):
        return FEED_FORWARD
    return None


@dataclass(frozen=True)
class LoraTarget:
    name: str            # kohya layer name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: nn.Module | LinearSlot   # the live base layer (Linear or Conv2d, or a part of a fused one)
    component: str       # "unet", "te" (SD1/SD2), "te1"/"te2" (SDXL), "lm" (a causal language model)
    role: str

    @property
    def is_text_encoder(self) -> bool:
        return self.component in TEXT_ENCODER_COMPONENTS

    @property
    def weight(self) -> torch.Tensor:
        """The live base weight (a view into the fused weight for a LinearSlot). The cast: every
        target is a Linear, a Conv2d, a Linear in all but class (is_linear) or a LinearSlot, and all
        of them have a tensor `weight`; nn.Module's __getattr__ cannot say so."""
        return cast(torch.Tensor, self.module.weight)

    @property
    def is_conv3x3(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and self.module.kernel_size != (1, 1)


def select_targets(all_targets: list[LoraTarget], preset: str, train_text_encoder: bool) -> list[LoraTarget]:
    roles = UNET_PRESETS[preset]
    chosen = [t for t in all_targets
              if (not t.is_text_encoder and t.role in roles) or (t.is_text_encoder and train_text_encoder)]
    if not chosen:
        raise ValueError(f"target_modules '{preset}' matched no layer of this model")
    return chosen
