"""Family detection from key names and shapes alone."""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

from .layouts import _preview

# ---------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------


class UnsupportedCheckpointError(ValueError):
    """A single file is no SD1 / SD2 / SDXL-base checkpoint this project can load."""


class DetectedFamily(NamedTuple):
    family: str  # "sd1" | "sd2" | "sdxl"
    description: str  # what was seen, for logs and error messages


def detect_family_and_variant(state: Mapping) -> DetectedFamily:
    """Tell the model family of a single-file checkpoint from its key names and shapes alone.

    ``state`` maps keys to tensors or to shapes (tuples), e.g. read lazily with safetensors'
    ``get_slice(key).get_shape()``. Rules, in order:

    1. ``conditioner.embedders.1.model.*`` (OpenCLIP) next to ``conditioner.embedders.0.transformer.*``
       (HF CLIP) -> "sdxl" (SGM layout). ``conditioner.embedders.0.model.*`` alone is the SDXL
       refiner: unsupported.
    2. ``cond_stage_model.model.*`` (OpenCLIP) -> "sd2".
    3. ``cond_stage_model.transformer.*`` (HF CLIP) -> "sd1".
    4. No text-encoder keys, only ``model.diffusion_model.*``: the UNet decides -- ``label_emb``
       (SDXL's size/pooled-text embedding) -> "sdxl"; 2-D (linear) ``proj_in`` -> "sd2"; else "sd1".
    Widths and layer counts go into the description; epsilon vs v-prediction (SD2) cannot be
    seen in the weights and is not claimed. Raises ``UnsupportedCheckpointError`` otherwise.
    """
    keys = list(state.keys())
    unet = _describe_unet(state, keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
            te1 = _describe_hf_clip(state, keys, "conditioner.embedders.0.transformer.")
            te2 = _describe_open_clip(state, keys, "conditioner.embedders.1.model.")
            return DetectedFamily("sdxl", f"SDXL (SGM layout; conditioner.embedders.0 = HF CLIP, {te1}; "
                                          f"conditioner.embedders.1 = OpenCLIP, {te2}; {unet})")
        if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
            raise UnsupportedCheckpointError("this is an SDXL refiner (conditioner.embedders.0 = OpenCLIP only); "
                                             "only SDXL base models are supported")
        raise UnsupportedCheckpointError(f"unknown SGM conditioner layout: {_top_prefixes(keys, 3)}")
    if has("cond_stage_model.model."):
        te = _describe_open_clip(state, keys, "cond_stage_model.model.")
        return DetectedFamily("sd2", f"SD2 (cond_stage_model.model = OpenCLIP, {te}; {unet}; "
                                     "epsilon or v-prediction is not visible in the weights)")
    if has("cond_stage_model.transformer."):
        te = _describe_hf_clip(state, keys, "cond_stage_model.transformer.")
        return DetectedFamily("sd1", f"SD1 (cond_stage_model.transformer = HF CLIP, {te}; {unet})")
    if has("model.diffusion_model."):
        if "model.diffusion_model.label_emb.0.0.weight" in state:
            family, why = "sdxl", "label_emb present"
        elif any(len(_shape(state[k])) == 2 for k in keys if k.endswith(".proj_in.weight")):
            family, why = "sd2", "linear proj_in"
        else:
            family, why = "sd1", "1x1-conv proj_in"
        return DetectedFamily(family, f"{family.upper()} judged from the UNet alone ({why}; {unet}); "
                                      "the file has no text-encoder keys")
    raise UnsupportedCheckpointError("cannot tell the model family: no SD1 (cond_stage_model.transformer.*), "
                                     "SD2 (cond_stage_model.model.*), SDXL (conditioner.embedders.*) or UNet "
                                     f"(model.diffusion_model.*) keys; top-level names: {_top_prefixes(keys, 2)}")


def _shape(value) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _layer_count(keys: list[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _describe_hf_clip(state: Mapping, keys: list[str], prefix: str) -> str:
    table = state.get(prefix + "text_model.embeddings.token_embedding.weight")
    width = _shape(table)[1] if table is not None else "?"
    layers = _layer_count(keys, rf"{re.escape(prefix)}text_model\.encoder\.layers\.(\d+)\.")
    return f"{width}-wide, {layers} layers"


def _describe_open_clip(state: Mapping, keys: list[str], prefix: str) -> str:
    table = state.get(prefix + "token_embedding.weight")
    width = _shape(table)[1] if table is not None else "?"
    layers = _layer_count(keys, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return f"{width}-wide, {layers} resblocks"


def _describe_unet(state: Mapping, keys: list[str]) -> str:
    parts = []
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None:
        shape = _shape(conv_in)
        parts.append(f"UNet {shape[0]} base channels")
        if shape[1] != 4:
            kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(shape[1], "non-standard")
            parts.append(f"{shape[1]} input channels ({kind})")
    to_k = next((k for k in keys if k.startswith("model.diffusion_model.") and k.endswith(".attn2.to_k.weight")), None)
    if to_k is not None:
        parts.append(f"cross-attention {_shape(state[to_k])[1]}")
    proj_in = next((k for k in keys if k.startswith("model.diffusion_model.") and k.endswith(".proj_in.weight")), None)
    if proj_in is not None:
        parts.append("linear proj_in" if len(_shape(state[proj_in])) == 2 else "conv proj_in")
    label_emb = state.get("model.diffusion_model.label_emb.0.0.weight")
    if label_emb is not None:
        parts.append(f"label_emb {_shape(label_emb)[1]}")
    return ", ".join(parts) if parts else "no UNet keys"


def _top_prefixes(keys: list[str], depth: int) -> str:
    prefixes = sorted({".".join(k.split(".")[:depth]) for k in keys})
    return _preview(prefixes)
