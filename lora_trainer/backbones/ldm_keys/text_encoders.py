"""Text encoders: HF CLIP and OpenCLIP (fused q/k/v) key conversion."""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

from ...diffusion.families import OPEN_CLIP, OPENAI_CLIP
from .layouts import _CLIP_POSITION_IDS, CheckpointKeyError, TextEncoderSlot, _raise_on_mismatch

def _text_encoder_to_ldm(te_sd: Mapping, slot: TextEncoderSlot) -> dict:
    if slot.clip_kind == OPENAI_CLIP:
        return _hf_clip_to_ldm(te_sd, slot.prefix)
    if slot.clip_kind == OPEN_CLIP:
        return {slot.prefix + key: tensor for key, tensor in open_clip_from_hf(te_sd).items()}
    raise NotImplementedError(f"text encoder kind {slot.clip_kind!r} is not implemented")


def _text_encoder_from_ldm(te_part: Mapping, slot: TextEncoderSlot, te_config: Mapping | None,
                           keep_text_model_level: bool | None) -> tuple[dict, dict]:
    if slot.clip_kind == OPENAI_CLIP:
        if keep_text_model_level is None:
            keep_text_model_level = installed_clip_keeps_text_model_level(False)
        return _hf_clip_from_ldm(te_part, slot.prefix, keep_text_model_level), {}
    if slot.clip_kind == OPEN_CLIP:
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
    raise NotImplementedError(f"text encoder kind {slot.clip_kind!r} is not implemented")


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
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
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


