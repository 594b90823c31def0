"""Key mapping between diffusers state dicts and the WebUI/LDM single-file checkpoint layout.

The WebUI stores a Stable Diffusion model as one state dict in the original (CompVis "LDM")
layout. diffusers splits it into UNet / VAE / text encoder with different module names. The
mapping is generated from the diffusers *configs* (block_out_channels, layers_per_block, block
types), so the same code serves the tiny test models and the real SD1.5 / SD2 / SDXL.

  layouts.py        family layouts as data (prefixes; text-encoder kinds from the family table), key errors
  tables.py         rename tables for the UNet and VAE; module names for LoRA targets
  text_encoders.py  HF CLIP and OpenCLIP (fused q/k/v) conversion
  convert.py        whole state dicts: components_to_ldm / ldm_to_components (+ SD1-shaped wrappers)
  detect.py         the family from key names and shapes alone
"""
from .convert import (DIFFUSERS_COMPONENTS, SplitCheckpoint, components_to_ldm, diffusers_to_ldm,
                      ldm_to_components, ldm_to_diffusers)
from .detect import DetectedFamily, UnsupportedCheckpointError, detect_family_and_variant
from .layouts import (LAYOUTS, SD1_LAYOUT, SD2_LAYOUT, SDXL_LAYOUT, CheckpointKeyError, CheckpointLayout,
                      TextEncoderSlot, layout_for)
from .tables import unet_diffusers_module_name, unet_ldm_module_name, unet_table, vae_table
from .text_encoders import installed_clip_keeps_text_model_level, open_clip_from_hf, open_clip_to_hf

__all__ = [
    "DIFFUSERS_COMPONENTS", "SplitCheckpoint", "components_to_ldm", "diffusers_to_ldm", "ldm_to_components",
    "ldm_to_diffusers", "DetectedFamily", "UnsupportedCheckpointError", "detect_family_and_variant",
    "LAYOUTS", "SD1_LAYOUT", "SD2_LAYOUT", "SDXL_LAYOUT", "CheckpointKeyError", "CheckpointLayout",
    "TextEncoderSlot", "layout_for", "unet_diffusers_module_name", "unet_ldm_module_name", "unet_table",
    "vae_table", "installed_clip_keeps_text_model_level", "open_clip_from_hf", "open_clip_to_hf",
]
