"""torch.compile for the training step (config `compile: true`).

What it buys (benchmarks/README.md, "Fast path"): fused element-wise kernels around the UNet's
convolutions and attention, so fewer passes over memory per step. What it costs: the first step
compiles for minutes (later runs reuse torch's on-disk cache), and every new input shape (another
aspect-ratio bucket, a smaller batch after an out-of-memory retry) compiles again.

Only the training call is compiled: the module itself stays eager, so previews (under no_grad, which
would need a second graph) and any other holder of the model are unaffected. On the CPU the compiled
call computes short attention as plain matmuls (short_attention.py: torch's CPU flash kernel is slow
on short sequences).
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch

from .short_attention import ShortAttentionAsMatmuls

_CPU_COMPILERS = ("g++", "c++", "clang++", "cl")


def compiler_problem(device: torch.device) -> str | None:
    """Why torch's default compiler backend (inductor) cannot build kernels here, or None."""
    if device.type == "cpu":
        wanted = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ((wanted,) if wanted else _CPU_COMPILERS)):
            return ("torch.compile on the CPU needs a C++ compiler (g++ or clang++; on Windows, MSVC's "
                    "cl.exe from the Visual Studio Build Tools)")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on a GPU needs triton (pip install triton; on Windows, triton-windows)"
    return None


def compiled_for_training(module: torch.nn.Module, device: torch.device, backend: str = "inductor"):
    """A compiled callable over `module` (sharing its parameters; the module is unchanged)."""
    problem = compiler_problem(device) if backend == "inductor" else None
    if problem:
        raise ValueError(f"compile: true, but {problem}. Install it, set compile_backend: aot_eager "
                         "(no speed-up), or set compile: false")
    compiled = torch.compile(module, backend=backend)
    if device.type != "cpu":
        return compiled

    def compiled_cpu_step(*args, **kwargs):
        with ShortAttentionAsMatmuls():   # traced into the graph; outside this call nothing changes
            return compiled(*args, **kwargs)
    return compiled_cpu_step
