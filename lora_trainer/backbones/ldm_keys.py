"""Key mapping between diffusers state dicts and the WebUI/LDM single-file checkpoint layout.

The WebUI stores a Stable Diffusion model as one state dict in the original (CompVis "LDM")
layout. diffusers splits it into UNet / VAE / text encoder with different module names. The
mapping is generated from the diffusers *configs* (block_out_channels, layers_per_block, block
types), so the same code serves the tiny test model and the real SD1.5.

A mapping is a table of module-path renames (``_Rename``). Translating a key looks up the
longest renamed prefix; "open" entries pass the rest of the path through unchanged (an
attention block's internals, a layer's ``.weight``/``.bias``), "closed" entries only exist so
that a container itself can be named (a resnet block: only its listed children are valid).

Families differ only in prefixes and text-encoder style (``CheckpointLayout``):

- SD1: HF CLIP under ``cond_stage_model.transformer.``.
- SD2: OpenCLIP ViT-H under ``cond_stage_model.model.`` (fused q/k/v ``in_proj``); the UNet differs
  only in its config (linear proj_in/out, 1024-wide cross-attention), which the tables follow.
- SDXL (SGM): HF CLIP-L under ``conditioner.embedders.0.transformer.``, OpenCLIP bigG under
  ``conditioner.embedders.1.model.``; the UNet adds ``label_emb`` (diffusers ``add_embedding``).

``components_to_ldm`` / ``ldm_to_components`` convert any family; ``diffusers_to_ldm`` /
``ldm_to_diffusers`` are the original SD1-shaped entry points (they also serve SD2).
``detect_family_and_variant`` tells the family from key names and shapes alone.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

# ---------------------------------------------------------------------------------------------
# Family layouts (data)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder inside a single-file checkpoint."""

    component: str  # the diffusers component it becomes: "text_encoder" or "text_encoder_2"
    prefix: str  # where its keys live in the single file
    # "hf_clip": a transformers CLIPTextModel state dict under the prefix (SD1, SDXL's first
    # embedder). "open_clip": an open_clip text tower (SD2, SDXL's second embedder), converted
    # to/from transformers' CLIPTextModel(WithProjection) layout.
    style: str
    # SD2: the WebUI runs the OpenCLIP tower up to its *penultimate* resblock (then ln_final), so
    # diffusers ships SD2's text encoder with 23 of the file's 24 layers. The checkpoint's last
    # resblock (and its text_projection, which only the dropped pooled path uses) is therefore
    # surplus on import: kept aside as "extras" (see ``SplitCheckpoint``), never an error.
    drops_last_layer: bool = False


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component lives inside a single-file checkpoint of one model family."""

    family: str
    unet_prefix: str
    vae_prefix: str
    text_encoders: tuple[TextEncoderSlot, ...]
    # Keys real checkpoints carry that are not weights of the models (noise schedule
    # buffers, EMA copies, ...): skipped on import instead of being reported as unknown.
    ignored_prefixes: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()

    @property
    def text_encoder_prefix(self) -> str:
        return self.text_encoders[0].prefix

    @property
    def text_encoder_style(self) -> str:
        return self.text_encoders[0].style

    def slot(self, component: str) -> TextEncoderSlot:
        for slot in self.text_encoders:
            if slot.component == component:
                return slot
        raise KeyError(f"the {self.family} layout has no {component}")


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
    text_encoders=(TextEncoderSlot("text_encoder", "cond_stage_model.transformer.", "hf_clip"),),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    ignored_keys=_LDM_SCHEDULE_BUFFERS,
)

SD2_LAYOUT = CheckpointLayout(
    family="sd2",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoders=(TextEncoderSlot("text_encoder", "cond_stage_model.model.", "open_clip", drops_last_layer=True),),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    ignored_keys=_LDM_SCHEDULE_BUFFERS,
)

SDXL_LAYOUT = CheckpointLayout(
    family="sdxl",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoders=(
        TextEncoderSlot("text_encoder", "conditioner.embedders.0.transformer.", "hf_clip"),
        TextEncoderSlot("text_encoder_2", "conditioner.embedders.1.model.", "open_clip"),
    ),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    # SGM's DiffusionEngine keeps its discretisation as a buffer: a state_dict() of the live
    # model (what a WebUI/SGM "save" writes) has it.
    ignored_keys=_LDM_SCHEDULE_BUFFERS + ("denoiser.sigmas",),
)

LAYOUTS = {"sd1": SD1_LAYOUT, "sd2": SD2_LAYOUT, "sdxl": SDXL_LAYOUT}


def layout_for(family: str) -> CheckpointLayout:
    """The layout of ``family`` ("sd1", "sd2", "sd2-v", "sdxl"; v-prediction does not change keys)."""
    key = "sd2" if family in ("sd2-v", "sd2_v") else family
    if key not in LAYOUTS:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[key]


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


# ---------------------------------------------------------------------------------------------
# State-dict conversion
# ---------------------------------------------------------------------------------------------

DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class SplitCheckpoint:
    """A single file split into diffusers state dicts.

    ``state_dicts``: component name -> diffusers state dict, for every component of the layout.
    ``extras``: text-encoder component -> checkpoint tensors that have no place in the diffusers
    model but belong to the file (keys relative to the encoder's prefix): SD2's last OpenCLIP
    resblock and text_projection, open_clip's ``logit_scale``. Pass them back to
    ``components_to_ldm`` to write a file with the same keys as the one read.
    """

    state_dicts: dict
    extras: dict


def components_to_ldm(state_dicts: Mapping[str, Mapping | None], configs: Mapping[str, Mapping] | None = None,
                      layout: CheckpointLayout = SD1_LAYOUT, extras: Mapping[str, Mapping] | None = None) -> dict:
    """Merge diffusers component state dicts into one LDM/SGM single-file state dict.

    ``state_dicts`` maps "unet", "vae", "text_encoder", "text_encoder_2" to state dicts (absent or
    ``None``: left out). ``configs`` needs "unet"/"vae" configs for those components (a model's
    ``.config`` works). ``extras`` (see ``SplitCheckpoint``) are added under their encoder's prefix.
    Tensors are not copied except where the layout fuses them (OpenCLIP's in_proj).
    """
    configs = configs or {}
    unknown = [name for name in state_dicts if name not in DIFFUSERS_COMPONENTS]
    if unknown:
        raise ValueError(f"unknown components {unknown}; expected some of {DIFFUSERS_COMPONENTS}")
    ldm: dict = {}
    if state_dicts.get("unet") is not None:
        ldm.update(_convert_to_ldm(state_dicts["unet"], unet_table(_need(configs, "unet")), layout.unet_prefix, "UNet"))
    if state_dicts.get("vae") is not None:
        ldm.update(_convert_to_ldm(state_dicts["vae"], vae_table(_need(configs, "vae")), layout.vae_prefix, "VAE"))
    for slot in layout.text_encoders:
        te_sd = state_dicts.get(slot.component)
        if te_sd is not None:
            ldm.update(_text_encoder_to_ldm(te_sd, slot))
        for key, tensor in ((extras or {}).get(slot.component) or {}).items():
            ldm[slot.prefix + key] = tensor
    if state_dicts.get("text_encoder_2") is not None and len(layout.text_encoders) < 2:
        raise ValueError(f"the {layout.family} layout has no second text encoder")
    return ldm


def ldm_to_components(ldm_sd: Mapping, configs: Mapping[str, Mapping], layout: CheckpointLayout = SD1_LAYOUT,
                      strict: bool = True, te_text_model_level: bool | None = None) -> SplitCheckpoint:
    """Split an LDM/SGM single-file state dict into diffusers state dicts, one per component.

    ``configs`` needs "unet" and "vae"; text-encoder configs ("text_encoder", "text_encoder_2") are
    optional and tell how many layers the diffusers model has and whether it carries a
    ``text_projection`` (CLIPTextModelWithProjection). Without one, an OpenCLIP encoder keeps all
    layers (SD2: all but the last) and gets a projection only as the SDXL second encoder.
    ``te_text_model_level``: as in ``ldm_to_diffusers``, for CLIPTextModel; CLIPTextModelWithProjection
    is asked separately (transformers >= 5.6 flattened only the former).
    """
    parts, stray = _split_by_component(ldm_sd, layout)
    if stray and strict:
        raise CheckpointKeyError(f"{len(stray)} checkpoint keys belong to no {layout.family} component: {_preview(stray)}")
    state_dicts = {
        "unet": _convert_to_diffusers(parts["unet"], unet_table(_need(configs, "unet")), "UNet"),
        "vae": _convert_to_diffusers(parts["vae"], vae_table(_need(configs, "vae")), "VAE"),
    }
    extras = {}
    for slot in layout.text_encoders:
        te_config = configs.get(slot.component)
        state_dicts[slot.component], extras[slot.component] = _text_encoder_from_ldm(
            parts[slot.component], slot, te_config, te_text_model_level)
    return SplitCheckpoint(state_dicts, extras)


def diffusers_to_ldm(unet_sd: Mapping | None, vae_sd: Mapping | None, te_sd: Mapping | None,
                     unet_config: Mapping | None, vae_config: Mapping | None,
                     layout: CheckpointLayout = SD1_LAYOUT, te2_sd: Mapping | None = None,
                     extras: Mapping[str, Mapping] | None = None) -> dict:
    """Merge diffusers component state dicts into one LDM single-file state dict.

    Pass ``None`` for a component to leave it out. Tensors are not copied (VAE attention
    weights become reshaped views). Raises ``CheckpointKeyError`` naming unknown or missing keys.
    (``components_to_ldm`` is the same with named components.)
    """
    return components_to_ldm({"unet": unet_sd, "vae": vae_sd, "text_encoder": te_sd, "text_encoder_2": te2_sd},
                             {"unet": unet_config, "vae": vae_config}, layout, extras)


def ldm_to_diffusers(ldm_sd: Mapping, unet_config: Mapping, vae_config: Mapping,
                     layout: CheckpointLayout = SD1_LAYOUT, strict: bool = True,
                     te_text_model_level: bool | None = None, te_config: Mapping | None = None) -> tuple[dict, dict, dict]:
    """Split an LDM single-file state dict into diffusers (unet_sd, vae_sd, te_sd).

    ``te_text_model_level``: whether the text-encoder keys keep the ``text_model.`` level
    (transformers < 5.6) or not; ``None`` asks the installed transformers. With ``strict``,
    keys belonging to no component (and not a known non-weight key) raise ``CheckpointKeyError``.
    Single-text-encoder families only; SDXL (and keeping the extras) needs ``ldm_to_components``.
    """
    if len(layout.text_encoders) != 1:
        raise ValueError(f"{layout.family} has {len(layout.text_encoders)} text encoders; use ldm_to_components")
    configs = {"unet": unet_config, "vae": vae_config, "text_encoder": te_config}
    split = ldm_to_components(ldm_sd, configs, layout, strict, te_text_model_level)
    return split.state_dicts["unet"], split.state_dicts["vae"], split.state_dicts["text_encoder"]


def _need(configs: Mapping, name: str) -> Mapping:
    config = configs.get(name)
    if config is None:
        raise ValueError(f"converting the {name} needs its diffusers config")
    return config


def _split_by_component(ldm_sd: Mapping, layout: CheckpointLayout):
    parts = {"unet": {}, "vae": {}, **{slot.component: {} for slot in layout.text_encoders}}
    stray = []
    prefixes = [(layout.unet_prefix, "unet"), (layout.vae_prefix, "vae")]
    prefixes += [(slot.prefix, slot.component) for slot in layout.text_encoders]
    for key, tensor in ldm_sd.items():
        if key in layout.ignored_keys or key.startswith(layout.ignored_prefixes):
            continue
        for prefix, component in prefixes:
            if key.startswith(prefix):
                parts[component][key[len(prefix):]] = tensor
                break
        else:
            stray.append(key)
    return parts, stray


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


# --- text encoders ---------------------------------------------------------------------------


def _text_encoder_to_ldm(te_sd: Mapping, slot: TextEncoderSlot) -> dict:
    if slot.style == "hf_clip":
        return _hf_clip_to_ldm(te_sd, slot.prefix)
    if slot.style == "open_clip":
        return {slot.prefix + key: tensor for key, tensor in open_clip_from_hf(te_sd).items()}
    raise NotImplementedError(f"text encoder style {slot.style!r} is not implemented")


def _text_encoder_from_ldm(te_part: Mapping, slot: TextEncoderSlot, te_config: Mapping | None,
                           keep_text_model_level: bool | None) -> tuple[dict, dict]:
    if slot.style == "hf_clip":
        if keep_text_model_level is None:
            keep_text_model_level = installed_clip_keeps_text_model_level(False)
        return _hf_clip_from_ldm(te_part, slot.prefix, keep_text_model_level), {}
    if slot.style == "open_clip":
        with_projection = _config_has_projection(te_config)
        if with_projection is None:
            # No config: SDXL's OpenCLIP is a CLIPTextModelWithProjection, SD2's a CLIPTextModel.
            with_projection = not slot.drops_last_layer
        if keep_text_model_level is None or with_projection:
            # CLIPTextModelWithProjection keeps "text_model." in every transformers version so far.
            keep_text_model_level = installed_clip_keeps_text_model_level(with_projection)
        layers = te_config.get("num_hidden_layers") if te_config else None
        te_sd, extras = open_clip_to_hf(te_part, layers=layers, with_projection=with_projection,
                                        drop_last_layer=slot.drops_last_layer, prefix=slot.prefix)
        if not keep_text_model_level:
            te_sd = {key.removeprefix("text_model."): tensor for key, tensor in te_sd.items()}
        return te_sd, extras
    raise NotImplementedError(f"text encoder style {slot.style!r} is not implemented")


def _config_has_projection(te_config: Mapping | None) -> bool | None:
    if te_config is None:
        return None
    return any("WithProjection" in name for name in te_config.get("architectures") or ())


# HF CLIP (SD1, SDXL's first embedder): the transformers state dict itself, with the text_model. level.

def _hf_clip_to_ldm(te_sd: Mapping, prefix: str) -> dict:
    converted = {}
    for key, tensor in te_sd.items():
        converted[prefix + _with_text_model_level(key)] = tensor
    position_ids_key = prefix + _CLIP_POSITION_IDS
    if position_ids_key not in converted:
        converted[position_ids_key] = _position_ids_like(converted, prefix)
    _check_clip_keys(converted.keys(), prefix)
    return converted


def _hf_clip_from_ldm(te_part: Mapping, prefix: str, keep_text_model_level: bool) -> dict:
    converted = {}
    for key, tensor in te_part.items():
        full = _with_text_model_level(key)
        if full == _CLIP_POSITION_IDS:
            continue
        converted[full if keep_text_model_level else full[len("text_model."):]] = tensor
    _check_clip_keys([prefix + _with_text_model_level(k) for k in te_part], prefix)
    return converted


def _with_text_model_level(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (keys start at "embeddings."/"encoder."),
    # the LDM layout always has the "text_model." level.
    return key if key.startswith("text_model.") else "text_model." + key


def _position_ids_like(converted: Mapping, prefix: str):
    import torch

    table = converted[prefix + "text_model.embeddings.position_embedding.weight"]
    return torch.arange(table.shape[0], dtype=torch.int64, device=table.device).unsqueeze(0)


_CLIP_TOP_LEVEL = ("text_model.embeddings.", "text_model.encoder.layers.", "text_model.final_layer_norm.")
_CLIP_REQUIRED = ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
                  "text_model.final_layer_norm.weight")


def _check_clip_keys(keys: Iterable[str], prefix: str) -> None:
    keys = list(keys)
    relative = [k[len(prefix):] for k in keys]
    unknown = [k for k in relative if not k.startswith(_CLIP_TOP_LEVEL)]
    missing = [k for k in _CLIP_REQUIRED if k not in relative]
    _raise_on_mismatch("text encoder", "CLIP", [prefix + k for k in unknown], [prefix + k for k in missing])


# OpenCLIP (SD2, SDXL's second embedder) <-> transformers CLIPTextModel(WithProjection).
#
# open_clip's text tower: token_embedding, positional_embedding (a bare parameter), resblocks of
# (ln_1, attn = torch MultiheadAttention with q/k/v fused into in_proj_weight/in_proj_bias in that
# order, ln_2, mlp.c_fc, mlp.c_proj), ln_final, text_projection (a bare [width, embed] matrix used
# as x @ P), logit_scale (only CLIP's contrastive loss uses it). transformers keeps q/k/v apart
# and stores the projection as a bias-free Linear, i.e. the transpose.

_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_TOP_BACK = {v: k for k, v in _OPEN_CLIP_TOP.items()}
_OPEN_CLIP_LAYER = {  # child of encoder.layers.N -> child of transformer.resblocks.N
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_LAYER_BACK = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPEN_CLIP_PROJECTION = "text_projection"
_OPEN_CLIP_LOGIT_SCALE = "logit_scale"


def open_clip_from_hf(te_sd: Mapping) -> dict:
    """transformers CLIPTextModel(WithProjection) state dict -> open_clip text-tower keys (no prefix).

    Accepts keys with or without the ``text_model.`` level. ``position_ids`` (a buffer) is dropped.
    q/k/v are concatenated into ``in_proj_*`` (new tensors); everything else is passed through
    (``text_projection`` as a transposed view).
    """
    import torch

    out, unknown = {}, []
    qkv: dict[tuple[int, str], dict[str, object]] = {}
    layer_re = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    for key, tensor in te_sd.items():
        if key == "text_projection.weight":
            out[_OPEN_CLIP_PROJECTION] = tensor.t()
            continue
        full = _with_text_model_level(key)
        if full == _CLIP_POSITION_IDS:
            continue
        if full in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[full]] = tensor
            continue
        m = layer_re.match(full)
        if m is None:
            unknown.append(key)
            continue
        layer, child, kind = int(m.group(1)), m.group(2), m.group(3)
        if child.startswith("self_attn.") and child.split(".", 1)[1] in _QKV:
            qkv.setdefault((layer, kind), {})[child.split(".", 1)[1]] = tensor
        elif child in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[child]}.{kind}"] = tensor
        else:
            unknown.append(key)
    incomplete = []
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != set(_QKV):
            incomplete.append(f"text_model.encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{kind}")
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[name] for name in _QKV], dim=0)
    _raise_on_mismatch("text encoder", "CLIP (for OpenCLIP)", unknown, incomplete)
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight") if k not in out]
    _raise_on_mismatch("text encoder", "CLIP (for OpenCLIP)", [], missing)
    return out


def open_clip_to_hf(tower: Mapping, layers: int | None = None, with_projection: bool = False,
                    drop_last_layer: bool = False, prefix: str = "") -> tuple[dict, dict]:
    """open_clip text-tower keys (no prefix) -> (transformers state dict with ``text_model.``, extras).

    ``layers``: how many resblocks the transformers model has (its ``num_hidden_layers``); the
    tower's later resblocks go to the extras -- allowed only with ``drop_last_layer`` (SD2);
    without ``layers`` all resblocks are kept, or all but the last with ``drop_last_layer``.
    Fewer resblocks than ``layers`` is an error. ``with_projection``: emit ``text_projection.weight`` (the
    transpose) instead of putting the tower's projection into the extras. ``logit_scale`` always
    goes to the extras. ``prefix`` only decorates error messages. q/k/v are views into in_proj.
    """
    layer_re = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    fused_re = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    present = sorted({int(m.group(1)) for k in tower if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    count = len(present)
    if present != list(range(count)):
        raise CheckpointKeyError(f"{prefix}transformer.resblocks: layer indices are not 0..{count - 1}: {present}")
    if layers is None:
        layers = count - 1 if drop_last_layer and count else count
    if count < layers:
        raise CheckpointKeyError(f"{prefix}transformer.resblocks has {count} layers, the text-encoder config "
                                 f"wants {layers} -- does the config match the weights?")
    if count > layers and not drop_last_layer:
        raise CheckpointKeyError(f"{prefix}transformer.resblocks has {count} layers, the text-encoder config "
                                 f"only {layers} -- does the config match the weights?")
    out, extras, unknown = {}, {}, []
    for key, tensor in tower.items():
        if key in _OPEN_CLIP_TOP_BACK:
            out[_OPEN_CLIP_TOP_BACK[key]] = tensor
        elif key == _OPEN_CLIP_PROJECTION:
            if with_projection:
                out["text_projection.weight"] = tensor.t()
            else:
                extras[key] = tensor
        elif key == _OPEN_CLIP_LOGIT_SCALE:
            extras[key] = tensor
        elif (m := fused_re.match(key)) is not None:
            layer, kind = int(m.group(1)), m.group(2)
            if layer >= layers:
                extras[key] = tensor
                continue
            if tensor.shape[0] % 3:
                raise CheckpointKeyError(f"{prefix}{key}: shape {tuple(tensor.shape)} is not 3 stacked q/k/v")
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}.{kind}"] = part
        elif (m := layer_re.match(key)) is not None and m.group(2) in _OPEN_CLIP_LAYER_BACK:
            layer = int(m.group(1))
            if layer >= layers:
                extras[key] = tensor
            else:
                out[f"text_model.encoder.layers.{layer}.{_OPEN_CLIP_LAYER_BACK[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            unknown.append(prefix + key)
    missing = [prefix + v for v in _OPEN_CLIP_TOP.values() if v not in tower and v != "ln_final.bias"]
    if with_projection and _OPEN_CLIP_PROJECTION not in tower:
        missing.append(prefix + _OPEN_CLIP_PROJECTION)
    _raise_on_mismatch("text encoder", "OpenCLIP", unknown, missing)
    return out, extras


@functools.lru_cache(maxsize=2)
def installed_clip_keeps_text_model_level(with_projection: bool = False) -> bool:
    """Whether this transformers' CLIPTextModel (or ...WithProjection) nests its weights under ``text_model.``.

    transformers >= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection still has the level.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    probe_config = CLIPTextConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                                  num_attention_heads=1, max_position_embeddings=4, projection_dim=4,
                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        probe = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(probe_config)
    return any(key.startswith("text_model.") for key in probe.state_dict())


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
