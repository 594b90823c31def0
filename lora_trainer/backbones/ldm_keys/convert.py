"""State-dict conversion between diffusers components and a single-file checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .layouts import SD1_LAYOUT, CheckpointKeyError, CheckpointLayout, _raise_on_mismatch, _preview
from .tables import _RenameTable, unet_table, vae_table
from .text_encoders import _text_encoder_from_ldm, _text_encoder_to_ldm

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


def components_to_ldm(state_dicts: Mapping[str, Mapping | None], configs: Mapping[str, Mapping | None] | None = None,
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
    unet_sd, vae_sd = state_dicts.get("unet"), state_dicts.get("vae")
    if unet_sd is not None:
        ldm.update(_convert_to_ldm(unet_sd, unet_table(_need(configs, "unet")), layout.unet_prefix, "UNet"))
    if vae_sd is not None:
        ldm.update(_convert_to_ldm(vae_sd, vae_table(_need(configs, "vae")), layout.vae_prefix, "VAE"))
    for slot in layout.text_encoders:
        te_sd = state_dicts.get(slot.component)
        if te_sd is not None:
            ldm.update(_text_encoder_to_ldm(te_sd, slot))
        for key, tensor in ((extras or {}).get(slot.component) or {}).items():
            ldm[slot.prefix + key] = tensor
    if state_dicts.get("text_encoder_2") is not None and len(layout.text_encoders) < 2:
        raise ValueError(f"the {layout.family} layout has no second text encoder")
    return ldm


def ldm_to_components(ldm_sd: Mapping, configs: Mapping[str, Mapping | None], layout: CheckpointLayout = SD1_LAYOUT,
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
    parts: dict[str, dict] = {"unet": {}, "vae": {}, **{slot.component: {} for slot in layout.text_encoders}}
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


# --- text encoders ---------------------------------------------------------------------------
