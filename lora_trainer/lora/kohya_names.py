"""kohya-style LoRA layer names and how the A1111 WebUI resolves them (pure python, no torch).

A kohya LoRA file names each layer ``<prefix>_<module path with dots as underscores>`` and
stores ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha``. UNet paths use
the *diffusers* module names (``lora_unet_down_blocks_0_attentions_0_...``), text-encoder paths
the transformers CLIP names (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).

The WebUI names its own layers after the LDM modules, dots replaced by underscores
(``diffusion_model_input_blocks_1_1_proj_in``, ``transformer_text_model_encoder_layers_0_mlp_fc1``)
and converts kohya names to those with fixed SD1-layout index arithmetic. This module
re-implements that conversion (``webui_compvis_name``, ``webui_candidate_names``) so tests can
prove every name we write lands on a real layer, and provides the reverse direction for the
SD1 layout (``ldm_path_to_kohya_diffusers``).
"""

from __future__ import annotations

import re

UNET_PREFIX = "lora_unet"
TE_PREFIX_SD1 = "lora_te"  # SD1 and SD2 have one text encoder
TE1_PREFIX_SDXL = "lora_te1"
TE2_PREFIX_SDXL = "lora_te2"
TEXT_ENCODER_PREFIXES = (TE_PREFIX_SD1, TE1_PREFIX_SDXL, TE2_PREFIX_SDXL)

# LDM resnet children <-> diffusers resnet children (the WebUI's table, plus its inverse).
_RESNET_TO_LDM = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_LDM = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# SD2 / SDXL-G text encoders are open_clip models with different layer names.
_OPEN_CLIP_RENAMES = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))

# SD1 layout: every UNet level owns 3 LDM blocks (2 resnet(+attention) blocks, then the sampler).
_BLOCKS_PER_LEVEL = 3


# ---------------------------------------------------------------------------------------------
# kohya names
# ---------------------------------------------------------------------------------------------


def kohya_name(prefix: str, module_path: str) -> str:
    """``kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in")`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``.

    ``prefix`` may be given with or without its trailing underscore. For text-encoder prefixes
    the ``text_model.`` level is added when missing: transformers >= 5.6 dropped it from
    CLIPTextModel's module names, but every kohya/WebUI name includes it.
    """
    prefix = prefix.rstrip("_")
    if prefix in TEXT_ENCODER_PREFIXES and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


def split_kohya_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_down.weight"`` -> ``("lora_unet_x", "lora_down.weight")``, as the WebUI splits it."""
    layer, _, rest = key.partition(".")
    return layer, rest


# ---------------------------------------------------------------------------------------------
# The WebUI's resolution of kohya names
# ---------------------------------------------------------------------------------------------


def webui_compvis_name(kohya_key: str, is_sd2: bool = False) -> str:
    """The WebUI layer name a kohya layer name converts to (A1111 ``convert_diffusers_name_to_compvis``).

    Anything after the first dot (``.lora_down.weight``) is ignored. A name no rule matches is
    returned unchanged, as the WebUI does.
    """
    key = split_kohya_key(kohya_key)[0]
    for convert in _CONVERSION_RULES:
        converted = convert(key, is_sd2)
        if converted is not None:
            return converted
    return key


def webui_candidate_names(kohya_key: str, is_sd2: bool = False) -> list[str]:
    """Every layer name the WebUI looks up for ``kohya_key``, in its order; the first that exists wins.

    1. the converted name; 2. for ``..._q_proj``/``_k_proj``/``_v_proj`` the parent (SD2's
    MultiheadAttention); 3. one fallback: ``lora_unet`` -> ``diffusion_model`` (compvis-style
    names), else ``lora_te1_text_model`` -> ``0_transformer_text_model`` then
    ``transformer_text_model``, else ``oft_unet`` -> ``diffusion_model``.
    """
    key = split_kohya_key(kohya_key)[0]
    converted = webui_compvis_name(key, is_sd2)
    candidates = [converted]
    x_proj = re.match(r"(.*)_([qkv]_proj)$", converted)
    if x_proj:
        candidates.append(x_proj.group(1))
    if "lora_unet" in key:
        candidates.append(key.replace("lora_unet", "diffusion_model"))
    elif "lora_te1_text_model" in key:
        candidates.append(key.replace("lora_te1_text_model", "0_transformer_text_model"))
        candidates.append(key.replace("lora_te1_text_model", "transformer_text_model"))
    elif "oft_unet" in key:
        candidates.append(key.replace("oft_unet", "diffusion_model"))
    return _unique(candidates)


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))   # (dicts keep insertion order)


# --- the conversion rules, one function each, tried in the WebUI's order -----------------------


def _conv_in(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_conv_in(.*)", key)
    return m and f"diffusion_model_input_blocks_0_0{m.group(1)}"


def _conv_out(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_conv_out(.*)", key)
    return m and f"diffusion_model_out_2{m.group(1)}"


def _time_embedding(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    return m and f"diffusion_model_time_embed_{int(m.group(1)) * 2 - 2}{m.group(2)}"


def _block_suffix(kind: str, suffix: str) -> str:
    return _RESNET_TO_LDM.get(suffix, suffix) if kind == "resnets" else suffix


def _down_block(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if not m:
        return None
    level, kind, layer, suffix = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    slot = 1 if kind == "attentions" else 0
    return f"diffusion_model_input_blocks_{1 + level * _BLOCKS_PER_LEVEL + layer}_{slot}_{_block_suffix(kind, suffix)}"


def _mid_block(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if not m:
        return None
    kind, layer, suffix = m.group(1), int(m.group(2)), m.group(3)
    slot = 1 if kind == "attentions" else layer * 2
    return f"diffusion_model_middle_block_{slot}_{_block_suffix(kind, suffix)}"


def _up_block(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if not m:
        return None
    level, kind, layer, suffix = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    slot = 1 if kind == "attentions" else 0
    return f"diffusion_model_output_blocks_{level * _BLOCKS_PER_LEVEL + layer}_{slot}_{_block_suffix(kind, suffix)}"


def _downsampler(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    return m and f"diffusion_model_input_blocks_{3 + int(m.group(1)) * _BLOCKS_PER_LEVEL}_0_op"


def _upsampler(key: str, is_sd2: bool):
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if not m:
        return None
    level = int(m.group(1))
    # SD1's lowest up level has no attention, so its upsampler is the block's second module.
    slot = 2 if level > 0 else 1
    return f"diffusion_model_output_blocks_{2 + level * _BLOCKS_PER_LEVEL}_{slot}_conv"


def _open_clip_layer(rest: str) -> str:
    for old, new in _OPEN_CLIP_RENAMES:
        if old in rest:  # the first matching rename only, like the WebUI
            return rest.replace(old, new)
    return rest


def _text_encoder(key: str, is_sd2: bool):
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    if is_sd2:
        return f"model_transformer_resblocks_{layer}_{_open_clip_layer(rest)}"
    return f"transformer_text_model_encoder_layers_{layer}_{rest}"


def _text_encoder_2(key: str, is_sd2: bool):
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    return m and f"1_model_transformer_resblocks_{m.group(1)}_{_open_clip_layer(m.group(2))}"


_CONVERSION_RULES = (_conv_in, _conv_out, _time_embedding, _down_block, _mid_block, _up_block,
                     _downsampler, _upsampler, _text_encoder, _text_encoder_2)


# ---------------------------------------------------------------------------------------------
# LDM module path -> kohya (diffusers-style) name, SD1 layout
# ---------------------------------------------------------------------------------------------


def ldm_path_to_kohya_diffusers(ldm_module_path: str) -> str:
    """LDM module path -> kohya name with diffusers-style UNet path (SD1 layout).

    ``input_blocks.2.1.transformer_blocks.0.attn1.to_q`` ->
    ``lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q``. Accepts UNet paths
    with or without ``model.diffusion_model.``/``diffusion_model.``, and SD1 text-encoder paths
    (``cond_stage_model.transformer.text_model...`` or ``transformer.text_model...``) which give
    ``lora_te_text_model_...``. Raises ``ValueError`` for paths with no diffusers equivalent.
    """
    path = ldm_module_path
    for te_prefix in ("cond_stage_model.transformer.", "transformer."):
        if path.startswith(te_prefix + "text_model."):
            return kohya_name(TE_PREFIX_SD1, path[len(te_prefix):])
    for unet_prefix in ("model.diffusion_model.", "diffusion_model."):
        if path.startswith(unet_prefix):
            path = path[len(unet_prefix):]
            break
    diffusers_path = sd1_ldm_unet_path_to_diffusers(path)
    if diffusers_path is None:
        raise ValueError(f"no diffusers (kohya) name for LDM module {ldm_module_path!r} in the SD1 layout")
    return kohya_name(UNET_PREFIX, diffusers_path)


_TOP_LEVEL_FROM_LDM = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def sd1_ldm_unet_path_to_diffusers(path: str) -> str | None:
    """LDM UNet module path (relative to the UNet) -> diffusers path, SD1 block layout; None if none."""
    for ldm, diffusers in _TOP_LEVEL_FROM_LDM.items():
        if path == ldm or path.startswith(ldm + "."):
            return diffusers + path[len(ldm):]
    # The middle block is a flat sequence: resnet, attention, resnet.
    m = re.match(r"middle_block\.(\d+)(?:\.(.+))?$", path)
    if m:
        return _middle_block(int(m.group(1)), m.group(2))
    # Input/output blocks hold up to three modules each: resnet (0), attention (1), sampler.
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$", path)
    if m:
        side, block, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        to_diffusers = _input_block if side == "input_blocks" else _output_block
        return to_diffusers(block, slot, rest)
    return None


def _input_block(block: int, slot: int, rest: str | None) -> str | None:
    if block == 0:
        return None  # input_blocks.0.0 (conv_in) is handled as a top-level name
    level, layer = divmod(block - 1, _BLOCKS_PER_LEVEL)
    if layer == _BLOCKS_PER_LEVEL - 1:  # the level's downsampler
        return f"down_blocks.{level}.downsamplers.0.conv" if slot == 0 and rest == "op" else None
    return _layer_module(f"down_blocks.{level}", layer, slot, rest)


def _middle_block(index: int, rest: str | None) -> str | None:
    if index == 1:
        return "mid_block.attentions.0" + (f".{rest}" if rest else "")
    if index in (0, 2):
        return _resnet_child(f"mid_block.resnets.{index // 2}", rest)
    return None


def _output_block(block: int, slot: int, rest: str | None) -> str | None:
    level, layer = divmod(block, _BLOCKS_PER_LEVEL)
    if rest == "conv" and slot in (1, 2) and layer == _BLOCKS_PER_LEVEL - 1:
        return f"up_blocks.{level}.upsamplers.0.conv"
    return _layer_module(f"up_blocks.{level}", layer, slot, rest)


def _layer_module(block_path: str, layer: int, slot: int, rest: str | None) -> str | None:
    """Slot 0 of an LDM block is the resnet, slot 1 the spatial transformer (attention)."""
    if slot == 0:
        return _resnet_child(f"{block_path}.resnets.{layer}", rest)
    if slot == 1:
        return f"{block_path}.attentions.{layer}" + (f".{rest}" if rest else "")
    return None


def _resnet_child(resnet_path: str, rest: str | None) -> str | None:
    if rest is None:
        return resnet_path
    for ldm_child, diffusers_child in _RESNET_FROM_LDM.items():
        if rest == ldm_child or rest.startswith(ldm_child + "."):
            return f"{resnet_path}.{diffusers_child}{rest[len(ldm_child):]}"
    return None
