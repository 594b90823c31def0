"""DoRA (weight-decomposed LoRA): a trained magnitude per input channel on top of any adapter.

The WebUI (extensions-builtin/Lora/network.py, `apply_weight_decompose`) renders a file with a
`dora_scale` tensor as

    W' = dora_scale * (W + s*dW) / ||W + s*dW||      delta = (W' - W) * multiplier

with the norm taken over every axis but the INPUT one (transpose(0, 1) then a norm per row), so
`dora_scale` has shape (1, in) for a Linear and (1, in, 1, 1) for a Conv2d; LyCORIS writes it that
way (`wd_on_out` off). We compute exactly that, without LyCORIS's epsilon in the norm, because the
WebUI adds none.
"""
from __future__ import annotations

import torch


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W|| over all axes but axis 1, shaped to broadcast against W: (1, in, 1, ...)."""
    dims = [d for d in range(weight.dim()) if d != 1]
    return torch.linalg.vector_norm(weight, 2, dim=dims, keepdim=True)


@torch.no_grad()
def initial_magnitude(base_weight: torch.Tensor) -> torch.Tensor:
    """dora_scale of a fresh adapter: the base weight's own norms, so it starts as a no-op."""
    return input_axis_norm(base_weight.detach().to("cpu", torch.float32)).clone()


def decomposed_update(update: torch.Tensor, base_weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The weight update DoRA makes from a scaled update (before the multiplier)."""
    weight = base_weight.detach().to(update.dtype)
    merged = weight + update
    return merged * (magnitude.to(update.dtype) / input_axis_norm(merged)) - weight
