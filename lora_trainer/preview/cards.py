"""The WebUI's LoRA card files next to the LoRA: `<name>.preview.png` (thumbnail) and `<name>.json`
(the user metadata its card editor shows: description, sd version, activation text, preferred
weight, notes).

The JSON belongs to the user as much as to us: a field is only (re)written while it still holds
exactly what we wrote last time (or is empty/missing and was never ours), so a hand edit — in the
WebUI's editor or a text editor — is never overwritten. What we wrote last is kept under a private
key in the same JSON; the WebUI's editor keeps keys it does not know when it saves.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import safe_open

from ..contracts.backbone import DiffusionBackbone
from ..data.captions import top_tags
from ..storage.atomic import atomic_write_text
from ..training.control import TrainingObserver
from .images import save_png

log = logging.getLogger("lora_trainer")

CARD_FIELDS = ("description", "sd version", "activation text", "preferred weight", "notes")
RECORD_KEY = "lora_trainer last written"
# What the trainer's final message suggests (<lora:name:0.7>): strong but rarely overcooked.
PREFERRED_WEIGHT = 0.7
ACTIVATION_TAGS = 5


def card_json_path(lora_path: Path) -> Path:
    return Path(lora_path).with_suffix(".json")


def card_preview_path(lora_path: Path) -> Path:
    return Path(lora_path).with_suffix(".preview.png")


# ---- what the card says -------------------------------------------------------------------------

def activation_text(cfg, index) -> str:
    """The trigger word, else the tags in most captions (what the LoRA bound to; a tag in only
    some captions describes the images, not the LoRA), else the single most frequent tag."""
    if cfg.trigger_word:
        return cfg.trigger_word
    ranked = top_tags(index.records, ACTIVATION_TAGS)
    common = [tag for tag, count in ranked if 2 * count > index.num_images]
    return ", ".join(common or [tag for tag, _ in ranked[:1]])


def read_file_metadata(lora_path: Path) -> dict:
    with safe_open(str(lora_path), framework="pt") as f:
        return dict(f.metadata() or {})


def training_notes(cfg, index, metadata: dict) -> str:
    """A summary of the saved file's training, from its own metadata where it has it."""
    steps = metadata.get("ss_steps", "?")
    total = metadata.get("ss_max_train_steps", "?")
    epoch = metadata.get("ss_epoch", "?")
    rank = metadata.get("ss_network_dim", cfg.lora_rank)
    alpha = metadata.get("ss_network_alpha", cfg.lora_alpha if cfg.lora_alpha is not None else rank)
    base = metadata.get("ss_sd_model_name") or Path(cfg.base_model).name or "the loaded model"
    return (f"Trained with lora_trainer: {steps} of {total} steps, {epoch} epochs, "
            f"{index.num_images} images ({index.num_samples} samples per epoch with repeats), "
            f"rank {rank}, alpha {alpha}, learning rate {cfg.learning_rate}, "
            f"resolution {cfg.resolution}, base model {base}.")


def card_values(cfg, family_label: str, index, metadata: dict) -> dict:
    trigger = f" Trigger: {cfg.trigger_word}." if cfg.trigger_word else ""
    return {
        "description": f"LoRA '{metadata.get('ss_output_name', cfg.output_name)}' trained on "
                       f"{index.num_images} images.{trigger}",
        "sd version": family_label,
        "activation text": activation_text(cfg, index),
        "preferred weight": PREFERRED_WEIGHT,
        "notes": training_notes(cfg, index, metadata),
    }


# ---- merging with what is on disk ---------------------------------------------------------------

def _is_blank(value) -> bool:
    return value is None or value == ""


def merge_card(current: dict, wanted: dict) -> dict:
    """`current` with each field of `wanted` applied where the user has not edited it."""
    found = current.get(RECORD_KEY)
    record = found if isinstance(found, dict) else {}
    merged, written = dict(current), dict(record)
    for key, value in wanted.items():
        ours = key in record and current.get(key) == record[key]
        unclaimed = key not in record and _is_blank(current.get(key))
        if ours or unclaimed:
            merged[key] = value
            written[key] = value
    merged[RECORD_KEY] = written
    return merged


def _read_card(path: Path) -> dict | None:
    """The card JSON, {} when absent, None when it cannot be read (left alone then)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("Card %s is not readable JSON (%s); it is left as it is", path, error)
        return None
    if not isinstance(data, dict):
        log.warning("Card %s does not hold a JSON object; it is left as it is", path)
        return None
    return data


def update_card(path: Path, wanted: dict) -> dict | None:
    """Merge `wanted` into the card at `path` and write it atomically; returns what was written."""
    current = _read_card(path)
    if current is None:
        return None
    merged = merge_card(current, wanted)
    if merged != current:
        # the WebUI's own format (indent 4, UTF-8 kept), so its editor's diffs stay small
        atomic_write_text(path, json.dumps(merged, indent=4, ensure_ascii=False) + "\n")
    return merged


# ---- entry points -------------------------------------------------------------------------------

def write_card(lora_path: Path, cfg, family_label: str, index) -> dict | None:
    lora_path = Path(lora_path)
    wanted = card_values(cfg, family_label, index, read_file_metadata(lora_path))
    return update_card(card_json_path(lora_path), wanted)


def write_card_preview(lora_path: Path, image) -> Path:
    """The card thumbnail; the WebUI picks `<name>.png` first, so a user's own image still wins."""
    return save_png(card_preview_path(Path(lora_path)), image)


class CardWriter(TrainingObserver):
    """Refreshes `<name>.json` after every save of the run's LoRA. Snapshots (`<name>-<step>`) get
    none: one card file per snapshot would double the clutter in the WebUI's LoRA folder."""

    def __init__(self, cfg, backbone: DiffusionBackbone, index):
        self.cfg, self.family_label, self.index = cfg, backbone.family.label, index
        self.lora_path = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"

    def on_lora_saved(self, path) -> None:
        if Path(path).resolve() != self.lora_path.resolve():
            return
        try:
            write_card(Path(path), self.cfg, self.family_label, self.index)
        except (OSError, ValueError) as error:   # the LoRA is saved; a missing card must not stop training
            log.warning("Could not write the WebUI card for %s: %s", path, error)
