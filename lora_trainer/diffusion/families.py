"""Model families as data: one row per Stable Diffusion family (and variant) with everything that
differs between them as values. Adding a family means adding a row here (plus a branch inside each
backbone only for what is behaviour, not data: SDXL's pooled text embedding and size ids)."""
from __future__ import annotations

from dataclasses import dataclass

OPENAI_CLIP = "openai-clip"   # pads with <|endoftext|>
OPEN_CLIP = "openclip"        # pads with "!"


@dataclass(frozen=True)
class Family:
    name: str                     # "sd1" | "sd2" | "sdxl"
    label: str                    # what the WebUI's card calls it ("SD1", "SD2", "SDXL")
    ss_base_model_version: str    # kohya metadata the WebUI uses to show/hide a LoRA per model
    modelspec_architecture: str   # read by Forge / ComfyUI tooling
    text_encoder_prefixes: tuple[str, ...]   # kohya key prefix per text encoder
    default_resolution: int
    text_encoders: tuple[str, ...]           # the CLIP kind of each text encoder, in order
    latent_scale: float           # VAE latent scaling factor (when the VAE config does not say)
    conditioning_uses_sizes: bool  # SDXL's `vector` carries original/crop/target sizes
    kohya_v2: bool                # kohya's ss_v2 flag (SD2 text encoder and names)
    modelspec_implementation: str


_SGM = "https://github.com/Stability-AI/generative-models"

SD1 = Family("sd1", "SD1", "sd_v1", "stable-diffusion-v1/lora", ("lora_te",), 512, (OPENAI_CLIP,),
             0.18215, False, False, "diffusers")
SD2 = Family("sd2", "SD2", "sd_v2", "stable-diffusion-v2-512/lora", ("lora_te",), 512, (OPEN_CLIP,),
             0.18215, False, True, "diffusers")
SD2_V = Family("sd2", "SD2", "sd_v2_768_v", "stable-diffusion-v2-768-v/lora", ("lora_te",), 768, (OPEN_CLIP,),
               0.18215, False, True, "diffusers")
SDXL = Family("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", ("lora_te1", "lora_te2"),
              1024, (OPENAI_CLIP, OPEN_CLIP), 0.13025, True, False, _SGM)

FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
# rows that a prediction type selects within a family (SD2 768-v)
_VARIANTS = {("sd2", "v_prediction"): SD2_V}


def family_row(name: str, prediction_type: str) -> Family:
    """The row of family `name` ("sd1" | "sd2" | "sdxl") for a model predicting `prediction_type`."""
    return _VARIANTS.get((name, prediction_type), FAMILIES[name])
