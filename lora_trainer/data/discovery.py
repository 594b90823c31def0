"""Find the training images and their captions, and check them before any training starts.

Supported layouts (they can be mixed):
  flat         train_data_dir/a.png + a.txt
  kohya        train_data_dir/10_mychar/*.png   -> 10 repeats, folder "mychar". A folder's repeat
               prefix applies to everything below it (the nearest N_ ancestor wins); folders without
               the prefix use `default_repeats`.
  metadata.csv header `file_name,text`; file_name relative to train_data_dir or to the CSV's
               folder. CSV captions win over sidecar files; images the CSV does not list fall back
               to their sidecars.

Every problem is collected and reported at once (all missing CSV files, all unreadable images),
so a user fixes the dataset in one go instead of one error per run.

This module walks the folders and builds the records; captions are read in `caption_sources.py`,
and the result types (`DatasetIndex`, `ImageRecord`, `DataError`) live in `dataset_index.py`.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Tuple

from ..storage.hashing import file_sha256
from .caption_sources import (METADATA_FILE_NAME, _caption_for, _find_metadata_csv, _read_metadata_csv,
                              _warn_missing_captions)
from .dataset_index import DataError, DatasetIndex, ImageRecord, _accepted_extensions, _some_names
from .images import (DEFAULT_MAX_PIXELS, SUPPORTED_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, UnreadableImage,
                     load_rgb, probe_size)

BAD_IMAGE_POLICIES = ("fail", "skip")
# "10_mychar": 10 repeats of the images in folder "mychar".
REPEAT_FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")
# A prefix this large is almost always a date ("2023_holiday"), not a repeat count; say so.
_SUSPICIOUS_REPEATS = 1000
# Folders that zip tools create and that only hold metadata ("._x.png" AppleDouble files).
_IGNORED_DIR_NAMES = frozenset({"__MACOSX"})


@dataclass
class _Candidate:
    """An image that will become a record once its bytes are hashed and checked."""
    path: Path
    rel_path: str
    caption: str
    caption_source: str
    repeats: int
    folder: str


def discover(
    train_data_dir,
    metadata_path=None,
    caption_extension: str = ".txt",
    default_repeats: int = 1,
    bad_image_policy: str = "fail",
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DatasetIndex:
    """Index the dataset in `train_data_dir`. See the module docstring for the layouts.

    check_images=True fully decodes every image (slow for big datasets, but finds truncated
    files before training instead of in epoch 7); False only reads headers. Images of more than
    `max_pixels` pixels count as unreadable (see images.DEFAULT_MAX_PIXELS).
    Raises DataError with an actionable message for anything that stops training.
    """
    root = _check_root(train_data_dir)
    caption_extension = _normalise_caption_extension(caption_extension)
    _check_options(default_repeats, bad_image_policy)
    warnings: List[str] = []
    _warn_if_root_has_repeat_prefix(root, warnings)

    images, unsupported = _scan_tree(root, warnings)
    _warn_unsupported(unsupported, warnings)

    csv_path = _find_metadata_csv(root, metadata_path)
    csv_entries = _read_metadata_csv(csv_path, root, warnings) if csv_path else {}
    for rel_path, (path, _caption) in csv_entries.items():
        images.setdefault(rel_path, path)  # the CSV may name files the walk skipped (hidden dirs)

    candidates = _plan_candidates(images, csv_entries, caption_extension, default_repeats, warnings)
    records, bad = _inspect_candidates(candidates, check_images, max_pixels)
    _handle_bad_images(bad, root, bad_image_policy, warnings)
    if not records:
        raise _empty_dataset_error(root, unsupported, bad, candidates_found=bool(images))
    _warn_missing_captions(records, caption_extension, csv_path, warnings)
    return DatasetIndex(root=str(root), records=records, warnings=warnings,
                        metadata_path=str(csv_path) if csv_path else None)


# ---- options and root ----------------------------------------------------------------------------

def _check_root(train_data_dir) -> Path:
    if not train_data_dir:
        raise DataError("train_data_dir is not set: point it at the folder with your training images.")
    root = Path(os.path.abspath(os.path.expanduser(str(train_data_dir))))
    if not root.exists():
        raise DataError(f"train_data_dir '{root}' does not exist.")
    if not root.is_dir():
        raise DataError(f"train_data_dir '{root}' is a file; it must be a folder of images.")
    return root


def _normalise_caption_extension(extension: str) -> str:
    extension = (extension or "").strip()
    if not extension or extension == ".":
        raise DataError("caption_extension is empty; use e.g. '.txt'.")
    return extension if extension.startswith(".") else "." + extension


def _check_options(default_repeats: int, bad_image_policy: str) -> None:
    is_whole_number = isinstance(default_repeats, int) and not isinstance(default_repeats, bool)
    if not is_whole_number or default_repeats < 1:
        raise DataError(f"repeats must be a whole number >= 1, got {default_repeats!r}.")
    if bad_image_policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"bad_image_policy must be 'fail' or 'skip', got {bad_image_policy!r}.")


def _warn_if_root_has_repeat_prefix(root: Path, warnings: List[str]) -> None:
    # A common mistake: pointing train_data_dir at "10_mychar" itself and expecting 10 repeats.
    match = REPEAT_FOLDER_PATTERN.match(root.name)
    if match:
        warnings.append(
            f"train_data_dir '{root.name}' looks like a repeat folder, but only its sub-folders' "
            f"N_ prefixes are read. To train it with {match.group(1)} repeats, point train_data_dir "
            f"at its parent folder '{root.parent}'.")


# ---- walking the folder tree ---------------------------------------------------------------------

def _is_ignored_name(name: str) -> bool:
    # Hidden files/folders (.git, .ipynb_checkpoints, macOS "._x.png") are never training data.
    return name.startswith(".") or name in _IGNORED_DIR_NAMES


def _scan_tree(root: Path, warnings: List[str]) -> Tuple[Dict[str, Path], List[str]]:
    """All supported images ({rel_path: path}) and unsupported image-like files (rel paths)."""
    images: Dict[str, Path] = {}
    unsupported: List[str] = []
    visited_dirs = set()
    pending = [root]
    while pending:
        directory = pending.pop()
        real = os.path.realpath(directory)
        if real in visited_dirs:  # symlinked folders are followed, but never in a loop
            continue
        visited_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as exc:
            warnings.append(f"Could not list folder '{directory}': {exc.strerror or exc}")
            continue
        for entry in entries:
            if _is_ignored_name(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                pending.append(path)
                continue
            suffix = path.suffix.lower()
            rel_path = path.relative_to(root).as_posix()
            if suffix in SUPPORTED_EXTENSIONS:
                images[rel_path] = path
            elif suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
                unsupported.append(rel_path)
    return images, sorted(unsupported)


def _warn_unsupported(unsupported: List[str], warnings: List[str]) -> None:
    if not unsupported:
        return
    kinds = Counter(PurePosixPath(name).suffix.lower() for name in unsupported)
    kind_list = ", ".join(f"{ext} x{count}" for ext, count in sorted(kinds.items()))
    warnings.append(
        f"Ignored {len(unsupported)} file(s) in unsupported image formats ({kind_list}): "
        f"{_some_names(unsupported)}. Convert them to PNG or JPEG to train on them "
        f"(accepted: {_accepted_extensions()}).")


def _repeat_folder(rel_path: str, default_repeats: int) -> Tuple[int, str]:
    """(repeats, folder) from the nearest "N_name" folder above the image."""
    for part in reversed(PurePosixPath(rel_path).parts[:-1]):
        match = REPEAT_FOLDER_PATTERN.match(part)
        if match:
            return int(match.group(1)), match.group(2)
    return default_repeats, ""


def _repeat_folder_path(rel_path: str) -> str:
    """The rel path of the folder that sets an image's repeats (for messages)."""
    parts = PurePosixPath(rel_path).parts[:-1]
    for depth in range(len(parts), 0, -1):
        if REPEAT_FOLDER_PATTERN.match(parts[depth - 1]):
            return "/".join(parts[:depth])
    return ""


# ---- building records ----------------------------------------------------------------------------

def _plan_candidates(images: Dict[str, Path], csv_entries: Dict[str, Tuple[Path, str]],
                     caption_extension: str, default_repeats: int,
                     warnings: List[str]) -> List[_Candidate]:
    candidates: List[_Candidate] = []
    zero_repeat_folders = set()
    suspicious_folders = set()
    for rel_path in sorted(images):  # sorted: record order must not depend on the file system
        repeats, folder = _repeat_folder(rel_path, default_repeats)
        if repeats == 0:
            zero_repeat_folders.add(_repeat_folder_path(rel_path))
            continue
        if repeats > _SUSPICIOUS_REPEATS:
            suspicious_folders.add((_repeat_folder_path(rel_path), repeats))
        caption, source = _caption_for(rel_path, images[rel_path], csv_entries, caption_extension,
                                       warnings)
        candidates.append(_Candidate(images[rel_path], rel_path, caption, source, repeats, folder))
    for folder_path in sorted(zero_repeat_folders):
        warnings.append(f"Folder '{folder_path}' has 0 repeats, so its images are not trained on.")
    for folder_path, repeats in sorted(suspicious_folders):
        warnings.append(f"Folder '{folder_path}' means {repeats} repeats per epoch (the number "
                        "before '_' is a repeat count); rename it if that is not intended.")
    return candidates


def _inspect(candidate: _Candidate, check_images: bool, max_pixels: int) -> ImageRecord:
    try:
        sha256 = file_sha256(candidate.path)
    except OSError as exc:
        raise UnreadableImage(candidate.path, f"cannot read file ({exc.strerror or exc})") from exc
    if check_images:
        image = load_rgb(candidate.path, max_pixels)
        width, height = image.size
        image.close()
    else:
        width, height = probe_size(candidate.path, max_pixels)
    return ImageRecord(path=str(candidate.path), rel_path=candidate.rel_path,
                       caption=candidate.caption, repeats=candidate.repeats,
                       folder=candidate.folder, sha256=sha256, width=width, height=height,
                       caption_source=candidate.caption_source)


def _inspect_or_report(candidate: _Candidate, check_images: bool, max_pixels: int):
    try:
        return _inspect(candidate, check_images, max_pixels)
    except UnreadableImage as exc:
        return exc


def _inspect_candidates(candidates: List[_Candidate], check_images: bool, max_pixels: int
                        ) -> Tuple[List[ImageRecord], List[Tuple[str, str]]]:
    """Hash and check every image: (good records in order, [(rel_path, reason)] of bad ones)."""
    # Pillow decodes and hashlib hashes with the GIL released, so threads give a real speed-up on
    # large datasets; map() keeps the input order, so the result stays deterministic.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda c: _inspect_or_report(c, check_images, max_pixels), candidates))
    records, bad = [], []
    for candidate, result in zip(candidates, results):
        if isinstance(result, UnreadableImage):
            bad.append((candidate.rel_path, result.reason))
        else:
            records.append(result)
    return records, bad


def _handle_bad_images(bad: List[Tuple[str, str]], root: Path, policy: str,
                       warnings: List[str]) -> None:
    if not bad:
        return
    problems = [f"{rel_path}: {reason}" for rel_path, reason in bad]
    if policy == "fail":
        raise DataError(
            f"{len(bad)} unreadable image(s) in '{root}':\n  " + "\n  ".join(problems)
            + "\nRe-export or delete them, or set bad_image_policy to 'skip' to train without them.",
            problems)
    for problem in problems:
        warnings.append(f"Skipped unreadable image {problem}")


def _empty_dataset_error(root: Path, unsupported: List[str], bad: List[Tuple[str, str]],
                         candidates_found: bool) -> DataError:
    message = (f"No training images found in '{root}' (sub-folders included; accepted "
               f"extensions: {_accepted_extensions()}; hidden files and folders are ignored).")
    if unsupported:
        message += (f" Found {len(unsupported)} file(s) in unsupported formats: "
                    f"{_some_names(unsupported)}; convert them to PNG or JPEG.")
    if bad:
        message += f" All {len(bad)} image(s) found were unreadable and skipped."
    elif candidates_found:
        message += " The images found are all in folders with 0 repeats."
    return DataError(message)


__all__ = [
    "BAD_IMAGE_POLICIES", "DataError", "DatasetIndex", "ImageRecord", "METADATA_FILE_NAME",
    "REPEAT_FOLDER_PATTERN", "discover",
]
