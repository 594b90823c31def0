"""An independent reference for what a LoRA file does to one layer's weight, written from the WebUI
Lora extension's rules (network.py `finalize_updown` / `apply_weight_decompose`, network_lora.py,
network_hada.py, network_lokr.py) and NOT from lora_trainer's adapters: tests compare the trainer's
adapters and files against it.

    delta = multiplier * dora(scale * updown),  scale = alpha / dim (1 without alpha or dim)
"""
from __future__ import annotations

import torch


def _updown_and_dim(keys: dict[str, torch.Tensor], shape) -> tuple[torch.Tensor, int | None]:
    f = {k: v.double() for k, v in keys.items()}
    if "lora_down.weight" in f:           # LoRA / LoCon: up (out, r[,1,1]) @ down (r, in[,kh,kw])
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape), down.shape[0]
    if "hada_w1_a" in f:                  # LoHa: Hadamard product of two low-rank products
        one = f["hada_w1_a"] @ f["hada_w1_b"]
        two = f["hada_w2_a"] @ f["hada_w2_b"]
        return (one * two).reshape(shape), f["hada_w1_b"].shape[0]
    # LoKr: Kronecker product; dim is the rank of whichever factor is decomposed
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    dim = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else None
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        dim = f["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape), dim


def layer_delta(keys: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The update the WebUI adds to `weight` for a file layer's `keys` (suffix -> tensor), in float64."""
    w = weight.detach().double()
    updown, dim = _updown_and_dim(keys, w.shape)
    if "alpha" in keys and dim is not None:
        updown = updown * (float(keys["alpha"]) / dim)
    if "dora_scale" in keys:
        merged = w + updown
        cols = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = cols.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
        updown = merged * (keys["dora_scale"].double() / norm) - w
    return updown * multiplier
