"""Attention kernels on the CPU: torch's flash kernel against the plain form, forward + backward.

    .venv/bin/python benchmarks/bench_attention.py            # bf16 and fp32, 2 threads

The shapes are the UNet's attention calls (self- and cross-attention over 77 caption tokens) at
SD1.5 512 px, batch 1, and in bench_training.py's model (256 px, batch 2). Each line prints both
kernels' median time and which one the fast path's compiled CPU step uses
(lora_trainer/backbones/short_attention.py: plain for short bf16 score matrices, flash otherwise),
so the threshold there can be checked on another CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_trainer.backbones import short_attention

# name -> (batch, heads, query tokens, head dim); keys: the same tokens (self) or 77 (cross)
SHAPES = {
    "SD1.5 512px, 64x64 latent": (1, 8, 4096, 40),
    "SD1.5 512px, 32x32": (1, 8, 1024, 80),
    "SD1.5 512px, 16x16": (1, 8, 256, 160),
    "bench model, 32x32": (2, 4, 1024, 16),
    "bench model, 16x16": (2, 4, 256, 32),
    "bench model, 8x8": (2, 4, 64, 64),
}
CAPTION_TOKENS = 77


def flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def milliseconds(fn, q, k, v, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):   # the first call warms up
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        start = time.perf_counter()
        fn(*leaves).float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, median ms")
    print(f"{'shape':28s}{'kind':>6s}{'dtype':>10s}{'flash':>10s}{'plain':>10s}{'faster':>8s}  fast path uses")
    for dtype in (torch.bfloat16, torch.float32):
        for name, (batch, heads, tokens, dim) in SHAPES.items():
            for kind, keys in (("self", tokens), ("cross", CAPTION_TOKENS)):
                q, k, v = (torch.randn(batch, heads, n, dim, dtype=dtype) for n in (tokens, keys, keys))
                ms_flash = milliseconds(flash, q, k, v, args.repeats)
                ms_plain = milliseconds(short_attention.plain_attention, q, k, v, args.repeats)
                routed = short_attention.uses_plain_form((q, k, v), {})
                print(f"{name:28s}{kind:>6s}{str(dtype)[6:]:>10s}{ms_flash:>10.1f}{ms_plain:>10.1f}"
                      f"{'plain' if ms_plain < ms_flash else 'flash':>8s}  {'plain' if routed else 'flash'}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
