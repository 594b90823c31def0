"""Key mapping between diffusers state dicts and the WebUI/LDM single-file checkpoint layout.

The WebUI stores a Stable Diffusion model as one state dict in the original (CompVis "LDM")
layout. diffusers splits it into UNet / VAE / text encoder with different module names. The
mapping is generated from the diffusers *configs* (block_out_channels, layers_per_block, block
types), so the same code serves the tiny test model and the real SD1.5.

A mapping is a table of module-path renames (``_Rename``). Translating a key looks up the
longest renamed prefix; "open" entries pass the rest of the path through unchanged (an
attention block's internals, a layer's ``.weight``/``.bias``), "closed" entries only exist so
that a container itself can be named (a resnet block: only its listed children are valid).

Families differ only in prefixes and text-encoder style (``CheckpointLayout``). Only SD1 is
implemented; SD2 (OpenCLIP under ``cond_stage_model.model.``) and SDXL (``conditioner.embedders.N``)
are meant to be added as further layouts plus a text-encoder converter.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

# ---------------------------------------------------------------------------------------------
# Family layouts (data)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component lives inside a single-file checkpoint of one model family."""

    family: str
    unet_prefix: str
    vae_prefix: str
    text_encoder_prefix: str
    # "hf_clip": a transformers CLIPTextModel state dict under the prefix (SD1, SDXL's first
    # embedder). "open_clip" (SD2, SDXL's second embedder) is not implemented yet.
    text_encoder_style: str
    # Keys real checkpoints carry that are not weights of the three models (noise schedule
    # buffers, EMA copies, ...): skipped on import instead of being reported as unknown.
    ignored_prefixes: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()


_LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)

SD1_LAYOUT = CheckpointLayout(
    family="sd1",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoder_prefix="cond_stage_model.transformer.",
    text_encoder_style="hf_clip",
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    ignored_keys=_LDM_SCHEDULE_BUFFERS,
)

# The text encoder's position_ids is a buffer: real SD1 checkpoints carry it, transformers
# >= 4.31 no longer saves it. Written on export for fidelity, dropped on import.
_CLIP_POSITION_IDS = "text_model.embeddings.position_ids"


class CheckpointKeyError(KeyError):
    """A state dict has keys the layout does not know, or lacks keys it needs."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------
# Rename tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rename:
    source: str
    target: str
    open: bool = True  # sub-paths pass through unchanged
    required: bool = True  # the state dict must have at least one key under it
    linear_as_conv1x1: bool = False  # diffusers Linear weight [C,C] <-> LDM 1x1 conv [C,C,1,1]


class _RenameTable:
    """Longest-prefix path translation, in either direction."""

    def __init__(self, renames: Iterable[_Rename]):
        self.renames = tuple(renames)
        self._forward = {r.source: r for r in self.renames}
        self._backward = {r.target: r for r in self.renames}
        if len(self._forward) != len(self.renames) or len(self._backward) != len(self.renames):
            raise ValueError("rename table has duplicate entries")

    def to_ldm(self, path: str) -> tuple[str, _Rename] | None:
        return self._translate(path, self._forward, "target")

    def to_diffusers(self, path: str) -> tuple[str, _Rename] | None:
        return self._translate(path, self._backward, "source")

    @staticmethod
    def _translate(path: str, table: Mapping[str, _Rename], side: str):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            rename = table.get(".".join(parts[:cut]))
            if rename is None:
                continue
            rest = parts[cut:]
            if rest and not rename.open:
                return None
            return ".".join([getattr(rename, side), *rest]), rename
        return None


# --- shared building blocks ------------------------------------------------------------------

_UNET_RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_VAE_RESNET_CHILDREN = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}

# diffusers' VAE attention uses Linear layers where LDM uses 1x1 convolutions.
_VAE_ATTENTION_CHILDREN = {
    "group_norm": ("norm", False),
    "to_q": ("q", True),
    "to_k": ("k", True),
    "to_v": ("v", True),
    "to_out.0": ("proj_out", True),
}


def _resnet(source: str, target: str, children: Mapping[str, str], has_shortcut: bool) -> list[_Rename]:
    renames = [_Rename(source, target, open=False, required=False)]
    for diffusers_child, ldm_child in children.items():
        if diffusers_child == "conv_shortcut" and not has_shortcut:
            continue
        renames.append(_Rename(f"{source}.{diffusers_child}", f"{target}.{ldm_child}"))
    return renames


def _vae_attention(source: str, target: str) -> list[_Rename]:
    renames = [_Rename(source, target, open=False, required=False)]
    for diffusers_child, (ldm_child, reshape) in _VAE_ATTENTION_CHILDREN.items():
        renames.append(_Rename(f"{source}.{diffusers_child}", f"{target}.{ldm_child}", linear_as_conv1x1=reshape))
    return renames


def _per_block(value, count: int) -> list[int]:
    """diffusers allows an int or one value per block for layers_per_block."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or block_type.startswith("Attn")


# --- UNet ------------------------------------------------------------------------------------


def _unet_renames(config: Mapping) -> list[_Rename]:
    """The SD-style UNet table: conv_in, down blocks -> input_blocks, mid -> middle_block, up -> output_blocks.

    LDM numbers its blocks with one running counter per side: every resnet(+attention) layer
    and every down/upsampler of a level takes the next ``input_blocks``/``output_blocks`` index.
    """
    channels = list(config["block_out_channels"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(channels)
    layers = _per_block(config["layers_per_block"], levels)
    _check_supported_unet(config, down_types, up_types)

    renames = [
        _Rename("conv_in", "input_blocks.0.0"),
        _Rename("time_embedding.linear_1", "time_embed.0"),
        _Rename("time_embedding.linear_2", "time_embed.2"),
        _Rename("conv_norm_out", "out.0"),
        _Rename("conv_out", "out.2"),
    ]
    renames += _unet_down_renames(channels, layers, down_types)
    renames += _unet_mid_renames(config)
    renames += _unet_up_renames(channels, layers, up_types)
    return renames


def _check_supported_unet(config: Mapping, down_types: list[str], up_types: list[str]) -> None:
    known_down = {"CrossAttnDownBlock2D", "DownBlock2D"}
    known_up = {"CrossAttnUpBlock2D", "UpBlock2D"}
    unknown = [t for t in down_types if t not in known_down] + [t for t in up_types if t not in known_up]
    if unknown:
        raise NotImplementedError(f"UNet block types not supported by the LDM key mapping: {unknown}")
    if config.get("addition_embed_type") or config.get("class_embed_type"):
        raise NotImplementedError("UNet extra embeddings (SDXL add_embedding, class embeddings) are not mapped yet")
    levels = len(config["block_out_channels"])
    if len(down_types) != levels or len(up_types) != levels:
        raise ValueError("UNet config: block type lists and block_out_channels differ in length")


def _unet_down_renames(channels: list[int], layers: list[int], down_types: list[str]) -> list[_Rename]:
    renames: list[_Rename] = []
    index = 1  # input_blocks.0 is conv_in
    previous = channels[0]
    for level, block_type in enumerate(down_types):
        out = channels[level]
        for layer in range(layers[level]):
            source = f"down_blocks.{level}"
            resnet_in = previous if layer == 0 else out
            renames += _resnet(f"{source}.resnets.{layer}", f"input_blocks.{index}.0",
                               _UNET_RESNET_CHILDREN, has_shortcut=resnet_in != out)
            if _has_attention(block_type):
                renames.append(_Rename(f"{source}.attentions.{layer}", f"input_blocks.{index}.1"))
            index += 1
        if level < len(down_types) - 1:  # every level but the last halves the resolution
            renames.append(_Rename(f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{index}.0.op"))
            index += 1
        previous = out
    return renames


def _unet_mid_renames(config: Mapping) -> list[_Rename]:
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type is None:
        return []
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError(f"UNet mid block type not supported by the LDM key mapping: {mid_type}")
    return [
        *_resnet("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_CHILDREN, has_shortcut=False),
        _Rename("mid_block.attentions.0", "middle_block.1"),
        *_resnet("mid_block.resnets.1", "middle_block.2", _UNET_RESNET_CHILDREN, has_shortcut=False),
    ]


def _unet_up_renames(channels: list[int], layers: list[int], up_types: list[str]) -> list[_Rename]:
    reversed_channels = channels[::-1]
    reversed_layers = layers[::-1]
    renames: list[_Rename] = []
    index = 0
    previous = reversed_channels[0]
    for level, block_type in enumerate(up_types):
        out = reversed_channels[level]
        skip_from_next_level = reversed_channels[min(level + 1, len(channels) - 1)]
        count = reversed_layers[level] + 1  # up levels have one more layer: it eats the extra skip
        for layer in range(count):
            source = f"up_blocks.{level}"
            # Up resnets always get a concatenated skip, so in != out and a shortcut exists.
            skip = skip_from_next_level if layer == count - 1 else out
            resnet_in = (previous if layer == 0 else out) + skip
            renames += _resnet(f"{source}.resnets.{layer}", f"output_blocks.{index}.0",
                               _UNET_RESNET_CHILDREN, has_shortcut=resnet_in != out)
            if _has_attention(block_type):
                renames.append(_Rename(f"{source}.attentions.{layer}", f"output_blocks.{index}.1"))
            index += 1
        if level < len(up_types) - 1:
            # The upsampler sits in the level's last output block, after the resnet (and attention).
            slot = 2 if _has_attention(block_type) else 1
            renames.append(_Rename(f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{index - 1}.{slot}.conv"))
        previous = out
    return renames


# --- VAE -------------------------------------------------------------------------------------


def _vae_renames(config: Mapping) -> list[_Rename]:
    channels = list(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    unknown = [t for t in config["down_block_types"] if t != "DownEncoderBlock2D"]
    unknown += [t for t in config["up_block_types"] if t != "UpDecoderBlock2D"]
    if unknown:
        raise NotImplementedError(f"VAE block types not supported by the LDM key mapping: {unknown}")
    with_mid_attention = config.get("mid_block_add_attention", True)
    renames = [_Rename("quant_conv", "quant_conv"), _Rename("post_quant_conv", "post_quant_conv")]
    renames += _vae_side_renames("encoder", channels, layers, with_mid_attention)
    renames += _vae_side_renames("decoder", channels, layers, with_mid_attention)
    return renames


def _vae_side_renames(side: str, channels: list[int], layers: int, with_mid_attention: bool) -> list[_Rename]:
    renames = [
        _Rename(f"{side}.conv_in", f"{side}.conv_in"),
        _Rename(f"{side}.conv_norm_out", f"{side}.norm_out"),
        _Rename(f"{side}.conv_out", f"{side}.conv_out"),
    ]
    renames += _resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET_CHILDREN, False)
    if with_mid_attention:
        renames += _vae_attention(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1")
    renames += _resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET_CHILDREN, False)
    if side == "encoder":
        renames += _vae_encoder_levels(channels, layers)
    else:
        renames += _vae_decoder_levels(channels, layers)
    return renames


def _vae_encoder_levels(channels: list[int], layers: int) -> list[_Rename]:
    renames: list[_Rename] = []
    previous = channels[0]
    for level, out in enumerate(channels):
        for layer in range(layers):
            resnet_in = previous if layer == 0 else out
            renames += _resnet(f"encoder.down_blocks.{level}.resnets.{layer}", f"encoder.down.{level}.block.{layer}",
                               _VAE_RESNET_CHILDREN, has_shortcut=resnet_in != out)
        if level < len(channels) - 1:
            renames.append(_Rename(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv"))
        previous = out
    return renames


def _vae_decoder_levels(channels: list[int], layers: int) -> list[_Rename]:
    """diffusers counts decoder levels from the lowest resolution up; LDM keeps the encoder's numbering."""
    renames: list[_Rename] = []
    reversed_channels = channels[::-1]
    previous = reversed_channels[0]
    for level, out in enumerate(reversed_channels):
        ldm_level = len(channels) - 1 - level
        for layer in range(layers + 1):
            resnet_in = previous if layer == 0 else out
            renames += _resnet(f"decoder.up_blocks.{level}.resnets.{layer}", f"decoder.up.{ldm_level}.block.{layer}",
                               _VAE_RESNET_CHILDREN, has_shortcut=resnet_in != out)
        if level < len(channels) - 1:
            renames.append(_Rename(f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv"))
        previous = out
    return renames


# --- caching tables per config ---------------------------------------------------------------

_UNET_CONFIG_FIELDS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                       "mid_block_type", "addition_embed_type", "class_embed_type")
_VAE_CONFIG_FIELDS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                      "mid_block_add_attention")


def _config_key(config: Mapping, fields: tuple[str, ...]) -> str:
    missing = [f for f in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block") if f not in config]
    if missing:
        raise ValueError(f"config lacks {missing}; pass the model's diffusers config (e.g. model.config)")
    return json.dumps({f: _jsonable(config[f]) for f in fields if f in config}, sort_keys=True)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def unet_table(unet_config: Mapping) -> _RenameTable:
    return _unet_table_cached(_config_key(unet_config, _UNET_CONFIG_FIELDS))


def vae_table(vae_config: Mapping) -> _RenameTable:
    return _vae_table_cached(_config_key(vae_config, _VAE_CONFIG_FIELDS))


@functools.lru_cache(maxsize=32)
def _unet_table_cached(key: str) -> _RenameTable:
    return _RenameTable(_unet_renames(json.loads(key)))


@functools.lru_cache(maxsize=32)
def _vae_table_cached(key: str) -> _RenameTable:
    return _RenameTable(_vae_renames(json.loads(key)))


# ---------------------------------------------------------------------------------------------
# Module names (for LoRA targets)
# ---------------------------------------------------------------------------------------------


def unet_ldm_module_name(diffusers_module_path: str, unet_config: Mapping) -> str:
    """diffusers UNet module path -> LDM path relative to the UNet (no ``model.diffusion_model.``).

    ``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.2.1.transformer_blocks.0.attn1.to_q`` (SD1 layout).
    """
    hit = unet_table(unet_config).to_ldm(diffusers_module_path)
    if hit is None:
        raise CheckpointKeyError(f"no LDM name for UNet module {diffusers_module_path!r}")
    return hit[0]


def unet_diffusers_module_name(ldm_module_path: str, unet_config: Mapping) -> str:
    """Inverse of ``unet_ldm_module_name``; accepts paths with or without ``model.diffusion_model.``/``diffusion_model.``."""
    path = _strip_any_prefix(ldm_module_path, ("model.diffusion_model.", "diffusion_model."))
    hit = unet_table(unet_config).to_diffusers(path)
    if hit is None:
        raise CheckpointKeyError(f"no diffusers name for LDM UNet module {ldm_module_path!r}")
    return hit[0]


def _strip_any_prefix(path: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


# ---------------------------------------------------------------------------------------------
# State-dict conversion
# ---------------------------------------------------------------------------------------------


def diffusers_to_ldm(unet_sd: Mapping | None, vae_sd: Mapping | None, te_sd: Mapping | None,
                     unet_config: Mapping | None, vae_config: Mapping | None,
                     layout: CheckpointLayout = SD1_LAYOUT) -> dict:
    """Merge diffusers component state dicts into one LDM single-file state dict.

    Pass ``None`` for a component to leave it out. Tensors are not copied (VAE attention
    weights become reshaped views). Raises ``CheckpointKeyError`` naming unknown or missing keys.
    """
    ldm: dict = {}
    if unet_sd is not None:
        ldm.update(_convert_to_ldm(unet_sd, unet_table(unet_config), layout.unet_prefix, "UNet"))
    if vae_sd is not None:
        ldm.update(_convert_to_ldm(vae_sd, vae_table(vae_config), layout.vae_prefix, "VAE"))
    if te_sd is not None:
        ldm.update(_text_encoder_to_ldm(te_sd, layout))
    return ldm


def ldm_to_diffusers(ldm_sd: Mapping, unet_config: Mapping, vae_config: Mapping,
                     layout: CheckpointLayout = SD1_LAYOUT, strict: bool = True,
                     te_text_model_level: bool | None = None) -> tuple[dict, dict, dict]:
    """Split an LDM single-file state dict into diffusers (unet_sd, vae_sd, te_sd).

    ``te_text_model_level``: whether the text-encoder keys keep the ``text_model.`` level
    (transformers < 5.6) or not; ``None`` asks the installed transformers. With ``strict``,
    keys belonging to no component (and not a known non-weight key) raise ``CheckpointKeyError``.
    """
    unet_part, vae_part, te_part, stray = _split_by_component(ldm_sd, layout)
    if stray and strict:
        raise CheckpointKeyError(f"{len(stray)} checkpoint keys belong to no {layout.family} component: {_preview(stray)}")
    unet_sd = _convert_to_diffusers(unet_part, unet_table(unet_config), "UNet")
    vae_sd = _convert_to_diffusers(vae_part, vae_table(vae_config), "VAE")
    te_sd = _text_encoder_from_ldm(te_part, layout, te_text_model_level)
    return unet_sd, vae_sd, te_sd


def _split_by_component(ldm_sd: Mapping, layout: CheckpointLayout):
    unet, vae, te, stray = {}, {}, {}, []
    for key, tensor in ldm_sd.items():
        if key.startswith(layout.unet_prefix):
            unet[key[len(layout.unet_prefix):]] = tensor
        elif key.startswith(layout.vae_prefix) and not key.startswith(layout.ignored_prefixes):
            vae[key[len(layout.vae_prefix):]] = tensor
        elif key.startswith(layout.text_encoder_prefix):
            te[key[len(layout.text_encoder_prefix):]] = tensor
        elif key in layout.ignored_keys or key.startswith(layout.ignored_prefixes):
            continue
        else:
            stray.append(key)
    return unet, vae, te, stray


def _convert_to_ldm(state_dict: Mapping, table: _RenameTable, prefix: str, what: str) -> dict:
    converted, unknown, used = {}, [], set()
    for key, tensor in state_dict.items():
        hit = table.to_ldm(key)
        if hit is None:
            unknown.append(key)
            continue
        ldm_key, rename = hit
        used.add(rename.source)
        if rename.linear_as_conv1x1 and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[prefix + ldm_key] = tensor
    _raise_on_mismatch(what, "diffusers", unknown, _missing(table, used, lambda r: r.source))
    return converted


def _convert_to_diffusers(state_dict: Mapping, table: _RenameTable, what: str) -> dict:
    converted, unknown, used = {}, [], set()
    for key, tensor in state_dict.items():
        hit = table.to_diffusers(key)
        if hit is None:
            unknown.append(key)
            continue
        diffusers_key, rename = hit
        used.add(rename.source)
        if rename.linear_as_conv1x1 and key.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        converted[diffusers_key] = tensor
    _raise_on_mismatch(what, "LDM", unknown, _missing(table, used, lambda r: r.target))
    return converted


def _missing(table: _RenameTable, used: set, name_of) -> list[str]:
    return [name_of(r) for r in table.renames if r.required and r.source not in used]


def _raise_on_mismatch(what: str, side: str, unknown: list[str], missing: list[str]) -> None:
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown {side} {what} keys: {_preview(unknown)}")
    if missing:
        problems.append(f"{len(missing)} {what} modules missing (no keys under): {_preview(missing)}")
    if problems:
        raise CheckpointKeyError("; ".join(problems) + " -- does the config match the weights?")


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


# --- text encoder ----------------------------------------------------------------------------


def _text_encoder_to_ldm(te_sd: Mapping, layout: CheckpointLayout) -> dict:
    _require_hf_clip(layout)
    converted = {}
    for key, tensor in te_sd.items():
        full = _with_text_model_level(key)
        converted[layout.text_encoder_prefix + full] = tensor
    position_ids_key = layout.text_encoder_prefix + _CLIP_POSITION_IDS
    if position_ids_key not in converted:
        converted[position_ids_key] = _position_ids_like(converted, layout)
    _check_clip_keys(converted.keys(), layout.text_encoder_prefix)
    return converted


def _text_encoder_from_ldm(te_part: Mapping, layout: CheckpointLayout, keep_text_model_level: bool | None) -> dict:
    _require_hf_clip(layout)
    if keep_text_model_level is None:
        keep_text_model_level = installed_clip_keeps_text_model_level()
    converted = {}
    for key, tensor in te_part.items():
        full = _with_text_model_level(key)
        if full == _CLIP_POSITION_IDS:
            continue
        converted[full if keep_text_model_level else full[len("text_model."):]] = tensor
    _check_clip_keys([_with_text_model_level(k) for k in te_part], "")
    return converted


def _with_text_model_level(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (keys start at "embeddings."/"encoder."),
    # the LDM layout always has the "text_model." level.
    return key if key.startswith("text_model.") else "text_model." + key


def _position_ids_like(converted: Mapping, layout: CheckpointLayout):
    import torch

    table = converted[layout.text_encoder_prefix + "text_model.embeddings.position_embedding.weight"]
    return torch.arange(table.shape[0], dtype=torch.int64).unsqueeze(0)


_CLIP_TOP_LEVEL = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
_CLIP_REQUIRED = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                  "text_model.final_layer_norm.weight")


def _check_clip_keys(keys: Iterable[str], prefix: str) -> None:
    keys = list(keys)
    relative = [k[len(prefix):] for k in keys]
    unknown = [k for k in relative if not k.startswith(_CLIP_TOP_LEVEL)]
    missing = [k for k in _CLIP_REQUIRED if k not in relative]
    _raise_on_mismatch("text encoder", "CLIP", [prefix + k for k in unknown], [prefix + k for k in missing])


def _require_hf_clip(layout: CheckpointLayout) -> None:
    if layout.text_encoder_style != "hf_clip":
        raise NotImplementedError(f"text encoder style {layout.text_encoder_style!r} ({layout.family}) is not implemented yet")


@functools.lru_cache(maxsize=1)
def installed_clip_keeps_text_model_level() -> bool:
    """Whether this transformers' CLIPTextModel nests its weights under ``text_model.`` (< 5.6)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    probe_config = CLIPTextConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                                  num_attention_heads=1, max_position_embeddings=4,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        probe = CLIPTextModel(probe_config)
    return hasattr(probe, "text_model")
