"""Find and load an open_clip model from local files only: never a download, never a pickle.

Accepted sources, in the order `resolve_model` tries them:
  --model-path FOLDER        open_clip's Hugging Face layout: open_clip_config.json + a
                             .safetensors weights file (open_clip_model.safetensors, ...)
  --model-path FILE.safetensors --model ARCH
                             weights + an architecture: a built-in open_clip name (ViT-B-32,
                             ViT-L-14, ...) or an open_clip model-config JSON file
  --model ARCH_OR_REPO [--cache-dir D]
                             a model already in a Hugging Face cache (default: the user's
                             cache) for one of open_clip's pretrained tags, or "org/repo"

Weights must be .safetensors: open_clip checkpoints in the wild are often .bin/.pt pickles,
which can run code when loaded; we refuse them and say how to convert.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, List, Optional

SAFE_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONFIG_NAME = "open_clip_config.json"

HOW_TO_PROVIDE = (
    "Provide a CLIP model on disk (nothing is downloaded), either\n"
    "  * a folder with open_clip_config.json and open_clip_model.safetensors (open_clip's Hugging Face\n"
    "    layout, e.g. a copy of laion/CLIP-ViT-B-32-laion2B-s34B-b79K):  --model-path FOLDER\n"
    "  * a .safetensors weights file plus its architecture name:  --model-path ViT-B-32.safetensors "
    "--model ViT-B-32\n"
    "  * a model already in a Hugging Face cache:  --model ViT-B-32 [--cache-dir ~/.cache/huggingface/hub]\n"
    "Only .safetensors weights are accepted (.bin/.pt files are pickles that can run code): convert a "
    "file you trust to open_clip_model.safetensors once, outside this tool (e.g. with the conversion "
    "script of the safetensors project), or use a model repository that ships .safetensors.")


class ModelNotFound(Exception):
    """No usable local model; the message says what was looked for and how to provide one."""


@dataclass(frozen=True)
class ModelSource:
    architecture: str            # built-in name, a config JSON path, or "local-dir:<folder>"
    weights: Path                # always a .safetensors file
    quick_gelu: bool = False     # OpenAI-trained weights need QuickGELU (from the pretrained tag)
    preprocess: Optional[dict] = None  # mean/std/... of the pretrained tag, if known


# ---- resolving ---------------------------------------------------------------------------------

def resolve_model(model_path=None, model_name: Optional[str] = None, cache_dir=None) -> ModelSource:
    if model_path:
        return _from_path(Path(os.path.expanduser(str(model_path))), model_name)
    if model_name:
        return _from_cache(model_name, cache_dir)
    raise ModelNotFound("No CLIP model given.\n" + HOW_TO_PROVIDE)


def _from_path(path: Path, model_name: Optional[str]) -> ModelSource:
    if not path.exists():
        raise ModelNotFound(f"--model-path '{path}' does not exist.\n" + HOW_TO_PROVIDE)
    if path.is_dir():
        weights = _safetensors_in(path)
        if model_name:
            return ModelSource(model_name, weights)
        if (path / CONFIG_NAME).is_file():
            return ModelSource(f"local-dir:{path}", weights)
        raise ModelNotFound(f"'{path}' has no {CONFIG_NAME}; add it, or name the architecture with "
                            "--model (e.g. --model ViT-B-32).\n" + HOW_TO_PROVIDE)
    _require_safetensors(path)
    if model_name:
        return ModelSource(model_name, path)
    if (path.parent / CONFIG_NAME).is_file():
        return ModelSource(f"local-dir:{path.parent}", path)
    raise ModelNotFound(f"'{path.name}' holds only weights: name its architecture with --model "
                        "(e.g. --model ViT-B-32) or put its open_clip_config.json next to it.")


def _safetensors_in(folder: Path) -> Path:
    for name in SAFE_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ModelNotFound(f"'{folder}' has several .safetensors files "
                            f"({', '.join(c.name for c in candidates)}); pass one with --model-path.")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    found = f" (found only pickled weights: {', '.join(pickles)})" if pickles else ""
    raise ModelNotFound(f"No .safetensors weights in '{folder}'{found}.\n" + HOW_TO_PROVIDE)


def _require_safetensors(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        kind = "a pickle, which can run code when loaded" if path.suffix.lower() in PICKLE_SUFFIXES \
            else "not a .safetensors file"
        raise ModelNotFound(f"'{path.name}' is {kind}; only .safetensors weights are accepted.\n"
                            + HOW_TO_PROVIDE)


def _from_cache(model_name: str, cache_dir) -> ModelSource:
    name = model_name.removeprefix("hf-hub:")
    looked = []
    for folder in _cache_dirs(cache_dir):
        looked.append(str(folder))
        source = (_plain_file_in(folder, name) or _hub_repo_in(folder, name)
                  or _pretrained_tag_in(folder, name))
        if source:
            return source
    raise ModelNotFound(f"No local copy of '{model_name}' found (looked in: {', '.join(looked)}).\n"
                        + HOW_TO_PROVIDE)


def _cache_dirs(cache_dir) -> List[Path]:
    if cache_dir:
        return [Path(os.path.expanduser(str(cache_dir)))]
    from huggingface_hub import constants  # honours HF_HOME / HF_HUB_CACHE

    return [Path(constants.HF_HUB_CACHE)]


def _plain_file_in(folder: Path, name: str) -> Optional[ModelSource]:
    """<cache-dir>/<NAME>.safetensors: the simplest way to drop a model in a folder."""
    path = folder / f"{name}.safetensors"
    return ModelSource(name, path) if "/" not in name and path.is_file() else None


def _hub_repo_in(folder: Path, repo_id: str) -> Optional[ModelSource]:
    """An "org/repo" open_clip repository in a Hugging Face cache."""
    if "/" not in repo_id:
        return None
    config = _cached_file(folder, repo_id, CONFIG_NAME)
    return _from_path(config.parent, None) if config else None


def _pretrained_tag_in(folder: Path, architecture: str) -> Optional[ModelSource]:
    """Weights of any of open_clip's pretrained tags for `architecture` in a Hugging Face cache."""
    import open_clip

    for tag in open_clip.list_pretrained_tags_by_model(architecture):
        cfg = open_clip.get_pretrained_cfg(architecture, tag)
        hub = cfg.get("hf_hub", "")
        if not hub:
            continue
        repo_id, file_name = _split_hub_id(hub)
        for candidate in _safe_names(file_name):
            path = _cached_file(folder, repo_id, candidate)
            if path:
                return ModelSource(architecture, path, bool(cfg.get("quick_gelu")), _preprocess_of(cfg))
    return None


def _split_hub_id(hub: str):
    """open_clip's "org/repo/" -> ("org/repo", ""); "org/repo/file.bin" -> ("org/repo", "file.bin")."""
    parts = hub.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _safe_names(file_name: str) -> Iterable[str]:
    """Safetensors names to look for where open_clip would fetch `file_name` (often a .bin)."""
    if file_name.endswith(".safetensors"):
        return (file_name,)
    names = [os.path.splitext(file_name)[0] + ".safetensors"] if file_name else []
    return list(dict.fromkeys(names + list(SAFE_WEIGHT_NAMES[:2])))


def _cached_file(folder: Path, repo_id: str, file_name: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, file_name, cache_dir=str(folder))
    return Path(found) if isinstance(found, str) else None  # may be a "known missing" sentinel


def _preprocess_of(tag_cfg: dict) -> dict:
    from open_clip.transform import PreprocessCfg

    keys = {f.name for f in fields(PreprocessCfg)}
    return {k: v for k, v in tag_cfg.items() if k in keys}


# ---- loading -----------------------------------------------------------------------------------

@dataclass
class LoadedClip:
    model: object
    preprocess: object     # PIL image -> tensor
    tokenizer: object      # list[str] -> token tensor
    device: object


def load_clip(source: ModelSource, device: str = "auto") -> LoadedClip:
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: nothing below may reach a hub
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    name = _registered_name(source.architecture, open_clip)
    # load_weights=False / pretrained_*=False: open_clip must not look for weights itself (it would
    # accept pickles and may download); we load the safetensors file explicitly afterwards.
    with _quiet_random_init_warning():
        model = open_clip.create_model(name, pretrained=None, load_weights=False,
                                       pretrained_image=False, pretrained_text=False,
                                       force_quick_gelu=source.quick_gelu,
                                       force_preprocess_cfg=source.preprocess)
    open_clip.load_checkpoint(model, str(source.weights), strict=True)
    torch_device = torch.device(_pick_device(device, torch))
    model = model.to(torch_device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(name), torch_device)


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns "initialized randomly" because we load the weights ourselves right after."""
    def drop(record):
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _registered_name(architecture: str, open_clip) -> str:
    """open_clip model name for `architecture`; a config JSON file is registered under its stem."""
    if architecture.startswith("local-dir:") or not architecture.lower().endswith(".json"):
        return architecture
    path = Path(os.path.expanduser(architecture))
    config = json.loads(path.read_text(encoding="utf-8"))
    if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelNotFound(f"'{path}' is not an open_clip model config (needs embed_dim, vision_cfg, "
                            "text_cfg; for an open_clip_config.json pass its folder as --model-path).")
    open_clip.add_model_config(path)
    return path.stem


def _pick_device(device: str, torch) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
