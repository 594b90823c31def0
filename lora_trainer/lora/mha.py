"""LoRA on `nn.MultiheadAttention` (the OpenCLIP text encoders inside the WebUI: SD2's, SDXL's second).

Its q, k and v projections are one fused `in_proj_weight` (3E x E) and its output projection is
`out_proj.weight`, used by the attention function directly (the `out_proj` Linear's own forward never
runs). The file stores them as four ordinary Linear LoRAs under the names transformers' CLIP (the
headless trainer, kohya, diffusers, ComfyUI) gives them, `…_self_attn_{q,k,v,out}_proj`; that is
also what the WebUI's Lora extension applies to a MultiheadAttention: each q/k/v update added into
its third of `in_proj_weight`, the out update into `out_proj.weight`.

Training does the same, differentiably: while adapters are attached, the attention's instance
`forward` (lora.host) runs the module with `in_proj_weight + cat(Δq, Δk, Δv)` and
`out_proj.weight + Δout` substituted for the parameters (`torch.func.functional_call`, which puts the
parameters back when the call returns), where Δ is each adapter's `delta()` (any variant). The module
tree, its parameters and `state_dict()` never change; a class-level patch of the forward (the WebUI
patches `nn.MultiheadAttention.forward`) is what runs inside.
"""
from __future__ import annotations

import torch
from torch import nn

from .host import AdapterHost, LinearSlot

SLOTS = ("q", "k", "v", "out")


class MultiheadAttentionHost(AdapterHost):
    """Instance `forward` of an `nn.MultiheadAttention` with LoRA adapters on its projections."""

    module: nn.MultiheadAttention   # built only as MhaProjection's host_class, over its module

    def __init__(self, module: nn.MultiheadAttention):
        super().__init__(module)
        self._inside = False

    def __call__(self, *args, **kwargs):
        # functional_call calls the module again, which lands here: run the base forward then
        if self._inside:
            return self.base_forward(*args, **kwargs)
        weights = self.merged_weights()
        if not weights:   # no adapter, or all at multiplier 0: bitwise the base output
            return self.base_forward(*args, **kwargs)
        self._inside = True
        try:
            return torch.func.functional_call(self.module, weights, args, kwargs)
        finally:
            self._inside = False

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """{parameter name: base weight + the adapters' updates} for the parameters that change
        (differentiable in the adapters' weights)."""
        deltas: dict[str, torch.Tensor] = {}
        for (_, slot), adapter in self.adapters.items():
            if adapter.multiplier != 0:
                delta = adapter.delta()
                deltas[slot] = delta if slot not in deltas else deltas[slot] + delta
        weights = {}
        in_proj = self.module.in_proj_weight
        if any(s in deltas for s in ("q", "k", "v")):
            third = (in_proj.shape[0] // 3, in_proj.shape[1])
            update = torch.cat([deltas[s].to(in_proj.dtype) if s in deltas else in_proj.new_zeros(third)
                                for s in ("q", "k", "v")])
            weights["in_proj_weight"] = in_proj + update
        if "out" in deltas:
            out = self.module.out_proj.weight
            weights["out_proj.weight"] = out + deltas["out"].to(out.dtype)
        return weights


class MhaProjection(LinearSlot):
    """The q, k, v (a third of `in_proj_weight`) or out (`out_proj.weight`) projection of one
    `nn.MultiheadAttention`, as a Linear-shaped LoRA target."""

    host_class = MultiheadAttentionHost
    module: nn.MultiheadAttention

    def __init__(self, module: nn.MultiheadAttention, slot: str):
        if slot not in SLOTS:
            raise ValueError(f"MultiheadAttention has no projection {slot!r} (one of {SLOTS})")
        if getattr(module, "in_proj_weight", None) is None:
            raise TypeError("LoRA on nn.MultiheadAttention needs its fused in_proj_weight "
                            "(kdim == vdim == embed_dim)")
        e = module.embed_dim
        super().__init__(module, slot, e, e)

    @property
    def weight(self) -> torch.Tensor:
        if self.slot == "out":
            return self.module.out_proj.weight
        i = SLOTS.index(self.slot)
        return self.module.in_proj_weight[i * self.out_features:(i + 1) * self.out_features]


def mha_projections(module: nn.MultiheadAttention) -> list[MhaProjection]:
    return [MhaProjection(module, slot) for slot in SLOTS]
