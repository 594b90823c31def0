"""Config-driven rename tables between diffusers and LDM/SGM module paths (UNet, VAE), and
the module-name mapping LoRA targets use."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

from .layouts import CheckpointKeyError

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
    if config.get("addition_embed_type") == "text_time":
        # SDXL: the pooled-text + size/crop embedding MLP. SGM: label_emb = Sequential(
        # Sequential(Linear, SiLU, Linear)); diffusers' add_time_proj (sinusoidal) has no weights.
        renames += [
            _Rename("add_embedding.linear_1", "label_emb.0.0"),
            _Rename("add_embedding.linear_2", "label_emb.0.2"),
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
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise NotImplementedError(f"UNet addition_embed_type {config['addition_embed_type']!r} is not mapped "
                                  "(only SDXL's 'text_time')")
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise NotImplementedError("UNet class embeddings are not mapped by the LDM key mapping")
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
                       "mid_block_type", "addition_embed_type", "class_embed_type", "num_class_embeds")
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


