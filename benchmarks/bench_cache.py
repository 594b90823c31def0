"""Cold vs warm latent/text cache, SD1- and SDXL-shaped tiny models (issue: persistent caches).

    .venv/bin/python benchmarks/bench_cache.py [--steps N] [--images N]

For each family it builds a tiny single-file checkpoint and a dataset of mixed aspect ratios, then
runs, each in a fresh process with the same cache folder:
  cold       first run: every image is VAE-encoded and every caption CLIP-encoded, then cached
  warm       second run (new run folder, same data): latents and embeddings come from the cache
  re-encode  random_crop on: the latents cannot be cached, so every step VAE-encodes its images
             (captions stay cached) — the "encode every step" way, through the same trainer
and prints, side by side, the time from process start to the first finished step and the
samples/s of the steady state (steps after the first two).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
t0 = float(sys.argv[2])
from lora_trainer.app.run_config import load_run_config
from lora_trainer.training.control import TrainingObserver
from lora_trainer.app.session import train_from_config

class Clock(TrainingObserver):
    def __init__(self):
        self.times = []
    def on_step(self, report):
        self.times.append(time.time())

clock = Clock()
cfg = load_run_config(sys.argv[1])
train_from_config(cfg, observers=[clock])
steady = clock.times[2:]
rate = (len(steady) - 1) * cfg.batch_size / (steady[-1] - steady[0]) if len(steady) > 1 else float("nan")
print(json.dumps({"first_step_s": clock.times[0] - t0, "samples_per_s": rate}))
"""


def build(family: str, root: Path, images: int) -> Path:
    from PIL import Image, ImageDraw

    from lora_trainer.backbones import tiny

    components = tiny.build_tiny(family, seed=0)
    checkpoint = root / f"tiny-{family}.safetensors"
    tiny.write_config_folder(root / f"tiny-{family}.config", components["configs"])
    tiny.write_single_file(checkpoint, components)
    data = root / f"data-{family}"
    data.mkdir()
    for i in range(images):
        size = (192, 256) if i % 2 else (256, 144)
        img = Image.new("RGB", size, (i * 13 % 255, 90, 200 - i * 7 % 200))
        ImageDraw.Draw(img).ellipse((10, 10, size[0] - 20, size[1] - 20), fill=(240, 200, 30))
        img.save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(f"bench picture {i}, yellow disc")
    return checkpoint


def write_config(root: Path, name: str, family: str, checkpoint: Path, steps: int, **extra) -> Path:
    import yaml

    cfg = dict(train_data_dir=str(root / f"data-{family}"), base_model=str(checkpoint), resolution=128,
               bucket_reso_steps=32, batch_size=2, max_train_steps=steps, epochs=1000, save_steps=0,
               lora_rank=8, output_dir=str(root / "lora"), output_name=f"{family}-{name}",
               run_dir=str(root / "runs" / f"{family}-{name}"), num_threads=2, tensorboard=False,
               check_data=False, **extra)
    path = root / f"{family}-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, cache: Path) -> dict:
    env = dict(os.environ, LORA_TRAINER_CACHE=str(cache), OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", WORKER, str(config), repr(time.time())], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in ("sd1", "sdxl"):
            checkpoint = build(family, root, args.images)
            cache = root / f"cache-{family}"
            results = {
                "cold": run(write_config(root, "cold", family, checkpoint, args.steps), cache),
                "warm": run(write_config(root, "warm", family, checkpoint, args.steps), cache),
                "re-encode": run(write_config(root, "reencode", family, checkpoint, args.steps,
                                              random_crop=True), cache),
            }
            rows.append((family, results))
    print(f"{'model':6} {'run':10} {'start -> first step (s)':>24} {'samples/s':>10}")
    for family, results in rows:
        for name, r in results.items():
            print(f"{family:6} {name:10} {r['first_step_s']:>24.2f} {r['samples_per_s']:>10.2f}")
    for family, results in rows:
        speedup = results["warm"]["samples_per_s"] / results["re-encode"]["samples_per_s"]
        saved = results["cold"]["first_step_s"] - results["warm"]["first_step_s"]
        print(f"{family}: warm cache starts {saved:.2f} s sooner than cold; steady state {speedup:.2f}x "
              "the re-encode-every-step run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
