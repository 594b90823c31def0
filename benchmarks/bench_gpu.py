"""GPU benchmark of the training step's levers: samples/s, MFU and peak VRAM at SD1.5 512² and
SDXL 1024², eager vs torch.compile, bf16 and fp16.

    python benchmarks/bench_gpu.py                      # SD1.5 at 512 and SDXL at 1024 on cuda:0
    python benchmarks/bench_gpu.py --family sd1 --batch 4 --steps 30
    python benchmarks/bench_gpu.py --family tiny --device cpu --steps 4    # smoke test of the script

What runs: the UNet of the real family (built from the configs shipped in
lora_trainer/backbones/configs, random weights made directly on the device: nothing is downloaded
and no file is written), frozen, with our LoRA layers (rank 8, the attn-mlp preset, as the Trainer
attaches them), and one training step = UNet forward + backward through the LoRA + AdamW, on
latents/conditioning made before the loop — the step the Trainer runs once its caches are filled
(it adds the cached-batch lookup and the noise, which are negligible on a GPU).

Rows: fp32 eager (TF32 matmuls allowed, as the Trainer leaves torch's default); bf16 base weights
under bf16 autocast (`mixed_precision: bf16`); the same + torch.compile (`compile: true`); fp16
likewise with a grad scaler (`mixed_precision: fp16`). Figures per row: s/step (median after
warm-up), samples/s, MFU = model FLOPs per step (counted once by torch.utils.flop_counter, forward +
backward) / step time / the GPU's dense bf16 peak (table below or --peak-tflops), and peak VRAM
(torch.cuda.max_memory_allocated, from a reset before the row). Each row runs in its own process so
compiled graphs and the allocator never carry over.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT_PREFIX = "BENCH_RESULT "
RANK = 8
# dense bf16 tensor-core peaks (TFLOPS, no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0, "RTX A6000": 155.0}
SETTINGS = {"sd1": {"resolution": 512, "batch": 4}, "sdxl": {"resolution": 1024, "batch": 2},
            "tiny": {"resolution": 64, "batch": 2}}
ROWS = {"fp32 eager": ("fp32", False), "bf16 eager": ("bf16", False), "bf16 + compile": ("bf16", True),
        "fp16 + compile": ("fp16", True)}


def build_unet(family: str, device: str, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    from lora_trainer.backbones.tiny_configs import SHIPPED_CONFIG_DIRS, load_config_dicts, tiny_configs

    configs = tiny_configs("sd1") if family == "tiny" else load_config_dicts(SHIPPED_CONFIG_DIRS[family])
    unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
    return unet.eval().requires_grad_(False)


def attach_lora(unet):
    import torch

    from lora_trainer.backbones.diffusers_sd import unet_role
    from lora_trainer.lora.network import LoRANetwork
    from lora_trainer.lora.targets import LoraTarget, select_targets

    targets = [LoraTarget("lora_unet_" + path.replace(".", "_"), module, "unet", role)
               for path, module in unet.named_modules() if (role := unet_role(path, module))]
    network = LoRANetwork(select_targets(targets, "attn-mlp", False), RANK)
    device = next(unet.parameters()).device
    network.to(device, dtype=torch.float32)
    network.attach()
    return [p for _, p in network.trainable_parameters(text_encoder=False)]


def inputs(unet, batch: int, resolution: int, device: str):
    import torch

    config = unet.config
    g = torch.Generator(device).manual_seed(0)
    side = resolution // 8
    latents = torch.randn((batch, config.in_channels, side, side), generator=g, device=device)
    cond = torch.randn((batch, 77, config.cross_attention_dim), generator=g, device=device)
    extra = {}
    if config.addition_embed_type == "text_time":   # SDXL: pooled text + size ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn((batch, pooled), generator=g, device=device),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch,
                                     device=device, dtype=torch.float32)}
    timesteps = torch.randint(0, 1000, (batch,), generator=g, device=device)
    noise = torch.randn(latents.shape, generator=g, device=device)
    return latents, timesteps, cond, extra, noise


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    precision, compile = ROWS[args.row]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = args.device
    settings = SETTINGS[args.family]
    batch, resolution = args.batch or settings["batch"], args.resolution or settings["resolution"]
    unet = build_unet(args.family, device, dtype)
    params = attach_lora(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    latents, timesteps, cond, extra, noise = inputs(unet, batch, resolution, device)
    forward = torch.compile(unet) if compile else unet
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=precision != "fp32")
    cuda = torch.device(device).type == "cuda"

    def step(model):
        with autocast:
            prediction = model(latents.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype), **extra).sample
        loss = F.mse_loss(prediction.float(), noise)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:   # eager: the model's FLOPs, not the kernels'
        step(unet)
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(forward)
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(forward)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"row": args.row, "batch": batch, "resolution": resolution, "flops_per_step": flops,
           "step_seconds": times, "warmup_seconds": warmup_s,
           "peak_vram_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
           "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return out


def peak_tflops(gpu: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():   # the more specific keys come first
        if key in gpu:
            return value
    return None


def run_family(args, family: str) -> list[dict]:
    results = []
    for row in args.rows or ROWS:
        cmd = [sys.executable, __file__, "--worker", row, "--family", family, "--device", args.device,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--resolution", str(args.resolution)] if args.resolution else []
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if done.returncode != 0 or not line:
            tail = (done.stderr or "")[-600:].strip().replace("\n", " | ")
            results.append({"row": row, "error": f"exit {done.returncode}: {tail}"})
        else:
            results.append(json.loads(line[-1][len(RESULT_PREFIX):]))
        print(f"  {family} {row}: done", flush=True)
    return results


def render(family: str, results: list[dict], override: float | None) -> str:
    ok = [r for r in results if "error" not in r]
    head = ok[0] if ok else {}
    peak = peak_tflops(head.get("gpu", ""), override)
    lines = [f"== {family}: {head.get('resolution')} px, batch {head.get('batch')}, LoRA rank {RANK} attn-mlp, "
             f"{head.get('gpu')} (bf16 peak {peak or '?'} TFLOPS), torch {head.get('torch')}",
             f"   {'row':18s}{'s/step':>9s}{'samples/s':>11s}{'MFU':>8s}{'peak VRAM':>11s}{'vs fp32':>9s}{'warm-up s':>11s}"]
    base = None
    for r in results:
        if "error" in r:
            lines.append(f"   {r['row']:18s} failed: {r['error']}")
            continue
        s = statistics.median(r["step_seconds"])
        base = base or s
        mfu = f"{r['flops_per_step'] / s / (peak * 1e12):.1%}" if peak else "-"
        vram = f"{r['peak_vram_gib']:.1f} GiB" if r["peak_vram_gib"] is not None else "-"
        lines.append(f"   {r['row']:18s}{s:9.3f}{r['batch'] / s:11.2f}{mfu:>8s}{vram:>11s}{base / s:8.2f}x"
                     f"{r['warmup_seconds']:11.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd1", "sdxl", "tiny", "both"), default="both")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling included)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--rows", type=lambda text: [r.strip() for r in text.split(",")],
                        help="a comma-separated subset of: " + ", ".join(ROWS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.row = args.worker
        worker(args)
        return 0
    families = ("sd1", "sdxl") if args.family == "both" else (args.family,)
    everything = {}
    for family in families:
        everything[family] = run_family(args, family)
        print(render(family, everything[family], args.peak_tflops), flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
