"""Layer names inside the WebUI's loaded model (LDM module paths) <-> kohya LoRA names, both ways.

The WebUI (A1111 v1.10) names every layer of `shared.sd_model` after its LDM module path with dots
replaced by underscores (its `network_layer_mapping`): `diffusion_model_input_blocks_1_1_proj_in`,
`transformer_text_model_encoder_layers_0_mlp_fc1`, SDXL's text encoders with an `0_` / `1_` prefix.
A LoRA file names the same layers the kohya way. Which kohya spelling we write is a per-family
choice, kept as data: the family table (diffusion.families: UNet naming, each text encoder's kohya
prefix and CLIP kind) plus, here, where the WebUI's model keeps each text encoder (`LAYOUTS`):

- SD1 / SD2 UNet: the diffusers-style name (`lora_unet_down_blocks_0_attentions_0_proj_in`), so a
  LoRA trained in the WebUI is byte-for-byte the file the headless trainer writes, and every loader
  (WebUI, Forge, ComfyUI, diffusers) reads it.
- SDXL UNet: kohya's native LDM name (`lora_unet_input_blocks_4_1_proj_in`); the WebUI's SD1-only
  index arithmetic would misplace SDXL up-samplers under diffusers-style names.
- Text encoders: transformers CLIP names (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`,
  `lora_te1_…`, `lora_te2_…`). OpenCLIP encoders (SD2, SDXL's second) name their MLP
  `mlp.c_fc` / `mlp.c_proj` (-> `mlp_fc1` / `mlp_fc2`) and have one `nn.MultiheadAttention` per
  resblock (`attn`): its q, k, v (thirds of `in_proj_weight`) and out projections are four targets
  (lora.mha) named `self_attn_{q,k,v,out}_proj`, as transformers' CLIP names them. The WebUI finds
  q/k/v on the attention itself (its `_[qkv]_proj` fallback) and out on its `out_proj` child, keeps
  each under the converted name (`model_transformer_resblocks_0_attn_q_proj`) and adds all four into
  the attention's weights: that converted name is the layer's WebUI name here.

Pure python apart from the role check (which looks at the module's type).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..diffusion.families import DIFFUSERS_NAMES, FAMILIES, OPEN_CLIP, OPENAI_CLIP
from ..lora.kohya_names import kohya_name, ldm_path_to_kohya_diffusers, webui_candidate_names
from ..lora.targets import PROJECTION, RESNET, SAMPLER, is_linear, transformer_block_role

# ---- per-family layout (data) ---------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderPlace:
    """Where one text encoder sits in the WebUI's model: what the family table cannot know."""
    root: str           # attribute path from the WebUI model to the module the WebUI names layers in
    webui_prefix: str   # "" (SD1/SD2) or "0_" / "1_" (SDXL embedders)
    # LDM's FrozenOpenCLIPEmbedder (SD2) runs its resblocks only up to `len - layer_idx` (with
    # "penultimate", all but the last): the layers after it are never run, get no gradient and are
    # not targets (diffusers' SD2 text encoder, the headless trainer's, does not have them either).
    # SGM's FrozenOpenCLIPEmbedder2 (SDXL) runs them all for its pooled output.
    stops_at_layer_idx: bool = False


@dataclass(frozen=True)
class TextEncoderLayout:
    component: str      # LoraTarget.component: "te" (SD1/SD2), "te1" / "te2" (SDXL)
    kohya_prefix: str   # lora_te / lora_te1 / lora_te2
    clip_kind: str      # diffusion.families OPENAI_CLIP (transformers CLIPTextModel) | OPEN_CLIP
    place: TextEncoderPlace

    @property
    def root(self) -> str:
        return self.place.root

    @property
    def webui_prefix(self) -> str:
        return self.place.webui_prefix

    @property
    def stops_at_layer_idx(self) -> bool:
        return self.place.stops_at_layer_idx


@dataclass(frozen=True)
class WebuiLayout:
    family: str                        # "sd1" | "sd2" | "sdxl" (diffusion.families)
    unet_naming: str                   # diffusion.families DIFFUSERS_NAMES | LDM_NAMES
    text_encoders: tuple[TextEncoderLayout, ...]
    webui_is_sd2: bool                 # the flag the WebUI passes to its name conversion

    @property
    def unet_root(self) -> str:
        return "model.diffusion_model"


def webui_layout(family: str, places: tuple[TextEncoderPlace, ...], webui_is_sd2: bool) -> WebuiLayout:
    """The layout of `family`: its row's UNet naming and text encoders (prefix, component, CLIP
    kind), each at its place in the WebUI's model."""
    row = FAMILIES[family]
    if len(places) != len(row.text_encoders):
        raise ValueError(f"{family} has {len(row.text_encoders)} text encoders, {len(places)} places given")
    encoders = tuple(TextEncoderLayout(component, prefix, kind, place) for component, prefix, kind, place
                     in zip(row.text_encoder_components, row.text_encoder_prefixes, row.text_encoders, places))
    return WebuiLayout(family, row.unet_naming, encoders, webui_is_sd2)


LAYOUTS = {
    "sd1": webui_layout("sd1", (TextEncoderPlace("cond_stage_model.wrapped", ""),), webui_is_sd2=False),
    "sd2": webui_layout("sd2", (TextEncoderPlace("cond_stage_model.wrapped", "", stops_at_layer_idx=True),),
                        webui_is_sd2=True),
    "sdxl": webui_layout("sdxl", (TextEncoderPlace("conditioner.embedders.0.wrapped", "0_"),
                                  TextEncoderPlace("conditioner.embedders.1.wrapped", "1_")),
                         webui_is_sd2=False),
}


def family_of(sd_model) -> str:
    """The model family from the flags the WebUI sets on its model (sd_models.set_model_type)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    flags = {k: getattr(sd_model, k, None) for k in ("is_sd1", "is_sd2", "is_sdxl", "is_sd3", "is_ssd")}
    raise ValueError(f"the loaded model is neither SD1, SD2 nor SDXL ({flags}); only those can be trained")


# ---- UNet -------------------------------------------------------------------------------------------

_RESNET_LEAVES = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)$")


def ldm_unet_role(path: str, module: nn.Module) -> str | None:
    """Role (lora.targets) of an LDM UNet layer, `path` relative to `diffusion_model`; None if LoRA
    never targets it. Same classes as the diffusers backbone's `unet_role`, spelled in LDM names."""
    if not (isinstance(module, nn.Conv2d) or is_linear(module)):
        return None
    parts = path.split(".")
    leaf = parts[-1]
    if "transformer_blocks" in parts:
        return transformer_block_role(path)
    if leaf in ("proj_in", "proj_out"):
        return PROJECTION
    if parts[0] in ("input_blocks", "middle_block", "output_blocks") and _RESNET_LEAVES.search(path):
        return RESNET
    if (parts[0] == "input_blocks" and leaf == "op") or (parts[0] == "output_blocks" and leaf == "conv"):
        return SAMPLER
    return None


def unet_kohya_name(ldm_path: str, layout: WebuiLayout) -> str:
    """kohya name of an LDM UNet layer (`path` relative to `diffusion_model`)."""
    if layout.unet_naming == DIFFUSERS_NAMES:
        return ldm_path_to_kohya_diffusers(ldm_path)
    return "lora_unet_" + ldm_path.replace(".", "_")


def unet_webui_name(ldm_path: str) -> str:
    """The WebUI's `network_layer_name` of an LDM UNet layer (it walks `sd_model.model`)."""
    return "diffusion_model_" + ldm_path.replace(".", "_")


# ---- text encoders -----------------------------------------------------------------------------------

_OPEN_CLIP_MLP = re.compile(r"^(?:model\.)?transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)$")
_OPEN_CLIP_ATTN = re.compile(r"^(?:model\.)?transformer\.resblocks\.(\d+)\.attn$")
_OPEN_CLIP_BLOCK = re.compile(r"^(?:model\.)?transformer\.resblocks\.(\d+)\.")
_OPEN_CLIP_TO_HF = {"c_fc": "fc1", "c_proj": "fc2"}


def text_encoder_kohya_name(path: str, encoder: TextEncoderLayout) -> str | None:
    """kohya name of a text-encoder Linear (`path` relative to the encoder's WebUI root), or None if
    it is not a LoRA target (embeddings, projections, open_clip attention)."""
    if encoder.clip_kind == OPENAI_CLIP:
        hf_path = path[len("transformer."):] if path.startswith("transformer.") else path
        if ".layers." not in "." + hf_path:
            return None
        return kohya_name(encoder.kohya_prefix, hf_path)
    m = _OPEN_CLIP_MLP.match(path)
    if not m:
        return None
    return f"{encoder.kohya_prefix}_text_model_encoder_layers_{m.group(1)}_mlp_{_OPEN_CLIP_TO_HF[m.group(2)]}"


def open_clip_attention_kohya_names(path: str, encoder: TextEncoderLayout) -> dict[str, str] | None:
    """{slot: kohya name} of the q/k/v/out projections of an OpenCLIP resblock's attention
    (`model.transformer.resblocks.3.attn`), or None if `path` is not one."""
    m = _OPEN_CLIP_ATTN.match(path) if encoder.clip_kind == OPEN_CLIP else None
    if not m:
        return None
    return {slot: f"{encoder.kohya_prefix}_text_model_encoder_layers_{m.group(1)}_self_attn_{slot}_proj"
            for slot in ("q", "k", "v", "out")}


def open_clip_layer_index(path: str) -> int | None:
    """The resblock index of an OpenCLIP text-encoder layer (`model.transformer.resblocks.3.mlp.c_fc`,
    `model.transformer.resblocks.3.attn`)."""
    m = _OPEN_CLIP_BLOCK.match(path + ".")
    return int(m.group(1)) if m else None


def text_encoder_webui_name(path: str, encoder: TextEncoderLayout) -> str:
    return encoder.webui_prefix + path.replace(".", "_")


# ---- resolution (kohya -> WebUI) ---------------------------------------------------------------------


def resolve_in_webui(kohya: str, webui_layer_names, layout: WebuiLayout) -> str | None:
    """The WebUI layer a kohya key lands on when the WebUI loads the file (its lookup order), or None."""
    for candidate in webui_candidate_names(kohya, layout.webui_is_sd2):
        if candidate in webui_layer_names:
            return candidate
    return None


@dataclass(frozen=True)
class LayerName:
    kohya: str           # name in the LoRA file
    ldm_path: str        # module path inside the WebUI model, e.g. model.diffusion_model.input_blocks.1.1.proj_in;
                         # a MultiheadAttention projection: the attention's path + .q_proj/.k_proj/.v_proj/.out_proj
    webui: str           # the WebUI's network_layer_name (an attention projection: the name the
                         # WebUI keeps it under, `<attention's name>_q_proj`, …)
    component: str       # "unet" | "te" | "te1" | "te2"
    role: str


class NameTable:
    """Every LoRA-able layer of one loaded model under its three names, looked up either way."""

    def __init__(self, layers: list[LayerName]):
        self.layers = sorted(layers, key=lambda n: n.kohya)
        self.by_kohya = {n.kohya: n for n in self.layers}
        self.by_ldm = {n.ldm_path: n for n in self.layers}
        self.by_webui = {n.webui: n for n in self.layers}
        if not (len(self.by_kohya) == len(self.by_ldm) == len(self.by_webui) == len(self.layers)):
            raise ValueError("two layers of the loaded model map to the same name")

    def kohya_of(self, ldm_path: str) -> str:
        return self.by_ldm[ldm_path].kohya

    def ldm_of(self, kohya: str) -> str:
        return self.by_kohya[kohya.partition(".")[0]].ldm_path

    def webui_of(self, kohya: str) -> str:
        return self.by_kohya[kohya.partition(".")[0]].webui
