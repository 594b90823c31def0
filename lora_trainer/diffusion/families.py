"""Model families as data: what differs between SD1, SD2 and SDXL for naming and metadata."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str                     # "sd1" | "sd2" | "sdxl"
    label: str                    # what the WebUI's card calls it ("SD1", "SD2", "SDXL")
    ss_base_model_version: str    # kohya metadata the WebUI uses to show/hide a LoRA per model
    modelspec_architecture: str   # read by Forge / ComfyUI tooling
    text_encoder_prefixes: tuple  # kohya key prefix per text encoder
    default_resolution: int


SD1 = Family("sd1", "SD1", "sd_v1", "stable-diffusion-v1/lora", ("lora_te",), 512)
SD2 = Family("sd2", "SD2", "sd_v2", "stable-diffusion-v2-512/lora", ("lora_te",), 512)
SD2_V = Family("sd2", "SD2", "sd_v2_768_v", "stable-diffusion-v2-768-v/lora", ("lora_te",), 768)
SDXL = Family("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", ("lora_te1", "lora_te2"), 1024)

FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
