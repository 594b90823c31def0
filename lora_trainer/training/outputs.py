"""Nothing lost: what a run checks before it loads a model, and what it does before it writes a
LoRA over an existing file.

* Every run folder has an id (`run.json`); every LoRA a run writes carries it in its metadata
  (`lora_trainer_run_id`). A file at `<output_dir>/<output_name>.safetensors` whose id is not the
  run folder's (nor one of the runs it started over from with `resume: false`) was written by
  someone else: another run, a download, a different tool. The run then stops before training
  unless `overwrite_output` is on, and even then the old file and its card files are moved to
  `<run_dir>/replaced/` before the first write (outside the WebUI's Lora folder, so it never shows
  as a card).
* output_dir and run_dir must be writable folders: found at the start, not at the first save after
  hours of training.
* Temp files of killed runs (`.<name>.<pid>-<hex>.tmp`, up to a whole LoRA each) are removed from
  output_dir, the run folder and the latent cache at the start.
"""
from __future__ import annotations

from typing import AbstractSet

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from ..storage.atomic import atomic_write_json, remove_stale_temp_files, temp_path_for, write_file_synced
from .caches import default_cache_dir

log = logging.getLogger("lora_trainer")

RUN_ID_KEY = "lora_trainer_run_id"     # LoRA metadata key
RUN_FILE = "run.json"                  # in the run folder: {"run_id", "earlier_run_ids"}
REPLACED_DIR = "replaced"              # in the run folder: files an overwrite moved aside
CARD_SUFFIXES = (".json", ".preview.png", ".png")   # the WebUI's card files next to a LoRA


class OutputConflict(RuntimeError):
    """The LoRA file the run would write belongs to someone else."""


class OutputNotWritable(RuntimeError):
    """output_dir or run_dir cannot be written."""


class LoraWriteFailed(RuntimeError):
    """The LoRA file could not be written after its checkpoint was saved."""


# ---- run identity ------------------------------------------------------------------------------

def _read_run_file(run_dir) -> dict:
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def owned_run_ids(run_dir) -> set[str]:
    """The run folder's id and those of the runs it started over from."""
    data = _read_run_file(run_dir)
    ids = [data.get("run_id"), *data.get("earlier_run_ids", [])]
    return {i for i in ids if isinstance(i, str) and i}


def ensure_run_id(run_dir, earlier: AbstractSet[str] = frozenset()) -> str:
    """The run folder's id, created (with `earlier` ids it took over) when the folder has none."""
    data = _read_run_file(run_dir)
    if isinstance(data.get("run_id"), str) and data["run_id"]:
        return data["run_id"]
    run_id = uuid.uuid4().hex
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / RUN_FILE, {"run_id": run_id, "earlier_run_ids": sorted(earlier)})
    return run_id


def _file_metadata(path) -> dict:
    """A LoRA file's metadata; {} for a missing or unreadable file (or not a safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one of ours
        return {}


def file_run_id(path) -> str | None:
    return _file_metadata(path).get(RUN_ID_KEY)


def lora_file_step(path, run_id: str) -> int | None:
    """The step (ss_steps) of the LoRA at `path` if this run wrote it, else None."""
    metadata = _file_metadata(path)
    if metadata.get(RUN_ID_KEY) != run_id or not str(metadata.get("ss_steps", "")).isdigit():
        return None
    return int(metadata["ss_steps"])


# ---- before the model is loaded ----------------------------------------------------------------

def lora_path_of(cfg) -> Path | None:
    """The single-file LoRA the run writes; None for tasks whose output is a folder (PEFT), which
    these checks do not cover."""
    if cfg.task_type != "sd":
        return None
    return Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"


def check_writable(folder, field: str) -> None:
    """Create `folder` if needed and write (and remove) a temp file in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path_for(folder / "write-test")
        write_file_synced(probe, b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise OutputNotWritable(f"{field}: {folder} is (or is inside) a file, not a folder; point "
                                f"{field} at a folder") from None
    except OSError as error:
        raise OutputNotWritable(f"{field}: cannot write into {folder} ({error.strerror or error}); "
                                f"fix its permissions or free space, or choose another {field}") from None


def check_output_is_ours(cfg) -> None:
    """Refuse (unless overwrite_output) when the LoRA file exists and another run wrote it."""
    path = lora_path_of(cfg)
    if path is None or not path.exists() or cfg.overwrite_output:
        return
    if file_run_id(path) in owned_run_ids(cfg.run_dir):
        return
    raise OutputConflict(
        f"{path} already exists and was not written by this run (run folder {cfg.run_dir}): "
        "another run's LoRA, a download or another tool's file. Choose another output_name, or "
        f"set overwrite_output: true (--overwrite-output) to replace it; the old file is then "
        f"kept in {Path(cfg.run_dir) / REPLACED_DIR}.")


def clean_stale_temp_files(cfg) -> list[Path]:
    """Temp files of killed runs in output_dir, the run folder and the latent/text cache."""
    folders = [Path(cfg.output_dir), Path(cfg.run_dir), Path(cfg.run_dir) / "logs"]
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cache.is_dir():   # the cache's own layout only: <cache>/<kind>/<2 hex>/
        folders += [entry for kind in cache.iterdir() if kind.is_dir()
                    for entry in kind.iterdir() if entry.is_dir() and len(entry.name) == 2]
    removed = [path for folder in folders for path in remove_stale_temp_files(folder)]
    if removed:
        log.info("removed %d temp file(s) left by killed runs (e.g. %s)", len(removed), removed[0])
    return removed


def preflight(cfg) -> None:
    """Everything about the run's outputs that can fail, checked before the (slow) model load."""
    check_writable(cfg.output_dir, "output_dir")
    check_writable(cfg.run_dir, "run_dir")
    check_output_is_ours(cfg)
    clean_stale_temp_files(cfg)


# ---- before each LoRA write --------------------------------------------------------------------

def set_aside_foreign_file(path, run_dir, run_id: str) -> Path | None:
    """Move `path` (and its card files) to `<run_dir>/replaced/` when it exists and this run did
    not write it; returns where the LoRA went. Called before every LoRA write, so a file someone
    put there during the run is kept too."""
    path = Path(path)
    if not path.is_file() or file_run_id(path) == run_id:   # folder outputs (PEFT) are not covered
        return None
    folder = Path(run_dir) / REPLACED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"{path.stem}.bak-{stamp}{path.suffix}"
    shutil.move(str(path), str(target))
    for suffix in CARD_SUFFIXES:
        card = path.with_suffix(suffix)
        if card.is_file():
            shutil.move(str(card), str(folder / f"{path.stem}.bak-{stamp}{suffix}"))
    log.warning("%s was not written by this run; moved it (and its card files) to %s", path, target)
    return target


def carry_run_ids(old_run_dir, new_run_dir) -> None:
    """`resume: false` moved the run folder aside: the new run may replace the LoRAs the old one
    wrote (they are set aside into replaced/ on the first write, nothing is lost)."""
    ensure_run_id(new_run_dir, earlier=owned_run_ids(old_run_dir))


__all__ = ["LoraWriteFailed", "OutputConflict", "OutputNotWritable", "RUN_ID_KEY", "carry_run_ids",
           "check_output_is_ours", "check_writable", "clean_stale_temp_files", "ensure_run_id",
           "file_run_id", "lora_file_step", "lora_path_of", "owned_run_ids", "preflight",
           "set_aside_foreign_file"]
