"""Short bf16 attention as two matmuls and a softmax, inside the compiled training step on the CPU.

Why: torch's CPU flash-attention kernel walks the keys in blocks sized for long sequences. When the
score matrix of a head is small (cross-attention over the 77 caption tokens, self-attention in the
UNet's low-resolution blocks) and the inputs are bf16 (the fast path's autocast), it is 1.2-3x
slower, forward + backward, than the plain form `softmax(q @ kᵀ · scale) @ v` run eagerly, and the
gap widens once compiled: inductor makes it two batched GEMMs with the scaling, the softmax and
the casts fused between them. Long self-attention keeps flash: there the plain form is
slower and its score matrix, kept for the backward, grows with the square of the tokens. In fp32
the two are close (flash faster on most shapes, plain up to 1.4x on a few small ones:
benchmarks/bench_attention.py), so fp32 attention is left alone (fp16 was not measured: left alone).
Measured in benchmarks/README.md ("Fast path", attention kernels).

Only the compiled training call runs under this mode (backbones/compiled.py): eager runs, previews
and GPUs keep torch's kernels. Under bf16 autocast the plain form computes what autocast computes
for any matmul (bf16 GEMMs, softmax in fp32), so it stays within the fast path's stated tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Scores per (batch, head) up to which the plain form is used. Measured on a 2-core AVX-512 CPU, bf16,
# forward + backward, eager (bench_attention.py): 4096 x 77 (cross-attention at 512 px) 1.2x faster
# plain, 1024 x 77 2.7x, 256 x 256 2.2x; 1024 x 1024 self-attention 1.5-2.8x faster with flash.
PLAIN_SCORES_LIMIT = 2 ** 19


def is_short(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[-2] * key.shape[-2] <= PLAIN_SCORES_LIMIT


def plain_attention(query, key, value, scale: float | None = None) -> torch.Tensor:
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    # the softmax in fp32 whatever the inputs (autocast would do the same), its output back in the
    # inputs' precision for the second GEMM
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype), value)


def uses_plain_form(args, kwargs) -> bool:
    """Plain q, k, v attention without mask, causality, dropout or grouped heads."""
    if len(args) != 3 or set(kwargs) - {"attn_mask", "dropout_p", "is_causal", "scale"}:
        return False
    if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or kwargs.get("dropout_p"):
        return False
    query, key, value = args
    return (query.dtype == torch.bfloat16 and query.dim() == key.dim() == value.dim() >= 3
            and query.shape[:-2] == key.shape[:-2] and key.shape[-2] == value.shape[-2]
            and is_short(query, key))


class ShortAttentionAsMatmuls(TorchFunctionMode):
    """Routes short `F.scaled_dot_product_attention` calls to `plain_attention`; the rest pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and uses_plain_form(args, kwargs):
            query, key, value = args
            return plain_attention(query, key, value, scale=kwargs.get("scale"))
        return func(*args, **kwargs)
