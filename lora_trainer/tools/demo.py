"""`lora-trainer demo`: everything needed to see a run end to end, built offline in seconds —
a tiny random-weight SD1, SD2 or SDXL model saved as a WebUI-style single file, a small synthetic dataset with
captions, and a YAML config that uses the seed's keys."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def draw_shape(shape: str, fg, bg, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    m = rng.randint(size // 8, size // 4)
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fg)
    return img


def write_dataset(folder: Path, count: int = 8, size: int = 96, seed: int = 0, trigger: str = "lt_demo") -> Path:
    """Images in a kohya repeat folder (`2_shapes`) with .txt captions."""
    rng = random.Random(seed)
    images = folder / "2_shapes"
    images.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        draw_shape(shape, COLOURS[fg], COLOURS[bg], size, rng).save(images / f"img_{i:02d}.png")
        (images / f"img_{i:02d}.txt").write_text(f"{trigger}, a {fg} {shape}, {bg} background\n",
                                                  encoding="utf-8")
    return folder


DEMO_YAML = """\
# Demo config: the seed's keys, pointed at a tiny offline model. Rerun with
#   lora-trainer train --config {config}
train_data_dir: "./data"
base_model: "./models/Stable-diffusion/tiny-{family}.safetensors"
lora_rank: 4
batch_size: 2
epochs: 5
learning_rate: 1e-3
output_dir: "./models/Lora"
output_name: "demo_{family}"
save_steps: 20
resolution: 64
trigger_word: "lt_demo"
num_threads: 2
"""


def prepare_demo(workdir: Path, family: str = "sd1") -> Path:
    from ..backbones import tiny

    workdir = Path(workdir).resolve()
    models = workdir / "models" / "Stable-diffusion"
    models.mkdir(parents=True, exist_ok=True)
    checkpoint = models / f"tiny-{family}.safetensors"
    if not checkpoint.exists():
        components = tiny.build_tiny(family, seed=0)
        # the configs go next to the file as `<stem>.config/`, which the loader picks up
        tiny.write_config_folder(models / f"tiny-{family}.config", components["configs"])
        tiny.write_single_file(checkpoint, components)
    if not (workdir / "data").exists():
        write_dataset(workdir / "data")
    config = workdir / "demo.yaml"
    if not config.exists():
        config.write_text(DEMO_YAML.format(family=family, config=config), encoding="utf-8")
    return config


LM_DEMO_YAML = """\
# Causal-LM demo: a tiny random LLaMA and a tokenizer made offline. Rerun with
#   lora-trainer train --config {config}
task_type: causal_lm
train_data_dir: "./data"
base_model: "./models/tiny-llama"
lora_rank: 8
target_modules: attn-mlp
max_seq_length: 64
batch_size: 4
epochs: 8
learning_rate: 1e-2
output_dir: "./output"
output_name: "demo_causal_lm"
save_steps: 20
save_precision: fp32
preview_prompts: ["What colour is the sky?"]
preview_every_n_steps: 20
preview_max_new_tokens: 8
num_threads: 2
"""


def prepare_lm_demo(workdir: Path) -> Path:
    """A tiny LLaMA folder (config, safetensors, tokenizer.json with a chat template), chats in
    jsonl + a .txt, and a config that trains them in seconds."""
    from ..tasks.causal_lm import tiny

    workdir = Path(workdir).resolve()
    model = workdir / "models" / "tiny-llama"
    if not (model / "model.safetensors").exists():
        tiny.write_tiny_llama(model, tiny.demo_texts(), seed=0)
    if not (workdir / "data").exists():
        tiny.write_demo_dataset(workdir / "data")
    config = workdir / "demo.yaml"
    if not config.exists():
        config.write_text(LM_DEMO_YAML.format(config=config), encoding="utf-8")
    return config
