"""Model families as data: one row per Stable Diffusion family (and variant) with everything that
differs between them as values. Adding a family means adding a row here (plus a branch inside each
backbone only for what is behaviour, not data: SDXL's pooled text embedding and size ids). The
backbones, the WebUI's name layout (webui/names.py), the CLI's and the demo's family choices read
this table; nothing else lists the families or their text encoders."""
from __future__ import annotations

from dataclasses import dataclass

OPENAI_CLIP = "openai-clip"   # pads with <|endoftext|>
OPEN_CLIP = "openclip"        # pads with "!"

# how kohya spells a UNet layer's name (lora_unet_<path with _>): from the diffusers module path
# (SD1, SD2) or from the LDM/SGM one (SDXL: kohya's native naming for it)
DIFFUSERS_NAMES = "diffusers"
LDM_NAMES = "ldm"


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
    unet_naming: str              # DIFFUSERS_NAMES | LDM_NAMES: the kohya name layout of the UNet

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        """LoraTarget.component of each text encoder: its kohya prefix without `lora_` ("te" for
        the one of SD1/SD2, "te1"/"te2" for SDXL's)."""
        return tuple(prefix.removeprefix("lora_") for prefix in self.text_encoder_prefixes)


_SGM = "https://github.com/Stability-AI/generative-models"

SD1 = Family("sd1", "SD1", "sd_v1", "stable-diffusion-v1/lora", ("lora_te",), 512, (OPENAI_CLIP,),
             0.18215, False, False, "diffusers", DIFFUSERS_NAMES)
SD2 = Family("sd2", "SD2", "sd_v2", "stable-diffusion-v2-512/lora", ("lora_te",), 512, (OPEN_CLIP,),
             0.18215, False, True, "diffusers", DIFFUSERS_NAMES)
SD2_V = Family("sd2", "SD2", "sd_v2_768_v", "stable-diffusion-v2-768-v/lora", ("lora_te",), 768, (OPEN_CLIP,),
               0.18215, False, True, "diffusers", DIFFUSERS_NAMES)
SDXL = Family("sdxl", "SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", ("lora_te1", "lora_te2"),
              1024, (OPENAI_CLIP, OPEN_CLIP), 0.13025, True, False, _SGM, LDM_NAMES)

FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}
# rows that a prediction type selects within a family (SD2 768-v)
_VARIANTS = {("sd2", "v_prediction"): SD2_V}


def family_row(name: str, prediction_type: str) -> Family:
    """The row of family `name` ("sd1" | "sd2" | "sdxl") for a model predicting `prediction_type`."""
    return _VARIANTS.get((name, prediction_type), FAMILIES[name])
