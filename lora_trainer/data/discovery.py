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
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Tuple

from .captions import split_tags
from .images import (SUPPORTED_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, UnreadableImage, load_rgb,
                     probe_size)

BAD_IMAGE_POLICIES = ("fail", "skip")
METADATA_FILE_NAME = "metadata.csv"
# "10_mychar": 10 repeats of the images in folder "mychar".
REPEAT_FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")
# A prefix this large is almost always a date ("2023_holiday"), not a repeat count; say so.
_SUSPICIOUS_REPEATS = 1000
# Folders that zip tools create and that only hold metadata ("._x.png" AppleDouble files).
_IGNORED_DIR_NAMES = frozenset({"__MACOSX"})
_MANIFEST_VERSION = b"lora_trainer.manifest.v1\n"
_NAMES_IN_A_MESSAGE = 10


class DataError(Exception):
    """The dataset cannot be used as configured. The message says what to fix.

    `problems` holds one line per offending file/row, for UIs that want to list them.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class ImageRecord:
    path: str            # absolute path of the image file
    rel_path: str        # posix path relative to train_data_dir: the record's stable identity
    caption: str
    repeats: int
    folder: str          # repeat folder name without its "N_" prefix, or "" outside such folders
    sha256: str          # of the file bytes: lets caches and resume detect a changed image
    width: int           # as displayed, i.e. after EXIF orientation
    height: int
    caption_source: str = "none"  # "csv" | "sidecar" | "none"


@dataclass
class DatasetIndex:
    root: str
    records: List[ImageRecord]
    warnings: List[str] = field(default_factory=list)
    metadata_path: Optional[str] = None  # the metadata.csv actually used, if any

    @property
    def num_images(self) -> int:
        return len(self.records)

    @property
    def num_samples(self) -> int:
        """Samples per epoch: every image counted `repeats` times."""
        return sum(record.repeats for record in self.records)

    def tag_frequency(self) -> Dict[str, Dict[str, int]]:
        """kohya-style `{"<repeats>_<folder>": {tag: count}}` (goes into ss_tag_frequency metadata).

        Images outside a repeat folder are grouped under the dataset folder's own name.
        """
        fallback_folder = Path(self.root).name or "images"
        frequency: Dict[str, Counter] = defaultdict(Counter)
        for record in self.records:
            key = f"{record.repeats}_{record.folder or fallback_folder}"
            frequency[key].update(split_tags(record.caption))
        return {key: dict(counts) for key, counts in sorted(frequency.items())}

    def manifest_hash(self) -> str:
        """Fingerprint of what is trained on: paths, image bytes, captions and repeats.

        Saved with checkpoints so a resume can tell the user their dataset changed under them.
        """
        entries = [[r.rel_path, r.sha256, r.caption, r.repeats]
                   for r in sorted(self.records, key=lambda r: r.rel_path)]
        # JSON gives every field an unambiguous encoding (no "a,b" + "c" == "a" + "b,c" collisions).
        encoded = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(_MANIFEST_VERSION + encoded).hexdigest()


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
) -> DatasetIndex:
    """Index the dataset in `train_data_dir`. See the module docstring for the layouts.

    check_images=True fully decodes every image (slow for big datasets, but finds truncated
    files before training instead of in epoch 7); False only reads headers.
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
    records, bad = _inspect_candidates(candidates, check_images)
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


# ---- captions ------------------------------------------------------------------------------------

def _normalise_caption(text: str) -> str:
    # Multi-line captions are joined with ", " so each line stays a separate unit for tag
    # shuffling (tag-per-line files) and sentences stay readable (caption-per-line files).
    lines = [line.strip().strip(",").strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _decode_caption(data: bytes, path: Path, warnings: List[str]) -> str:
    # Windows Notepad saves "Unicode" as UTF-16 with a BOM and "ANSI" as cp1252; both are common
    # in hand-written caption files, so read them instead of failing on a byte we cannot decode.
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")  # "-sig" drops the BOM some editors write
    except UnicodeDecodeError:
        warnings.append(f"Caption file '{path}' is not UTF-8; read it as Windows-1252. Re-save it "
                        "as UTF-8 if any characters look wrong.")
        return data.decode("cp1252", errors="replace")


def _read_sidecar(image_path: Path, caption_extension: str,
                  warnings: List[str]) -> Optional[str]:
    """The caption from `image.<caption_extension>`, or None if there is no such file."""
    caption_path = image_path.with_suffix(caption_extension)
    try:
        data = caption_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.append(f"Could not read caption file '{caption_path}': {exc.strerror or exc}; "
                        "the image trains with an empty caption.")
        return None
    return _normalise_caption(_decode_caption(data, caption_path, warnings))


def _warn_missing_captions(records: List[ImageRecord], caption_extension: str,
                           csv_path: Optional[Path], warnings: List[str]) -> None:
    missing = [r.rel_path for r in records if r.caption_source == "none"]
    empty = [r.rel_path for r in records if r.caption_source != "none" and not r.caption]
    if missing:
        sources = f"no {caption_extension} file" + (" and no metadata.csv row" if csv_path else "")
        warnings.append(f"{len(missing)} image(s) have no caption ({sources}) and train with an "
                        f"empty caption: {_some_names(missing)}")
    if empty:
        warnings.append(f"{len(empty)} image(s) have an empty caption: {_some_names(empty)}")


# ---- metadata.csv --------------------------------------------------------------------------------

def _find_metadata_csv(root: Path, metadata_path) -> Optional[Path]:
    if metadata_path:
        path = Path(os.path.abspath(os.path.expanduser(str(metadata_path))))
        if not path.is_file():
            raise DataError(f"metadata_path '{path}' does not exist (or is not a file).")
        return path
    default = root / METADATA_FILE_NAME
    return default if default.is_file() else None


def _metadata_columns(header: Optional[List[str]], csv_path: Path) -> Tuple[int, int]:
    names = [cell.strip().lower() for cell in (header or [])]
    text_column = next((name for name in ("text", "caption") if name in names), None)
    if "file_name" not in names or text_column is None:
        found = ",".join(header) if header else "an empty file"
        raise DataError(f"'{csv_path}' must start with a header row 'file_name,text' "
                        f"(found: {found}).")
    return names.index("file_name"), names.index(text_column)


def _resolve_listed_file(file_name: str, root: Path, csv_dir: Path) -> Optional[Path]:
    # Backslashes: CSVs written on Windows ("sub\a.png"). Tried second because on POSIX a
    # backslash is a legal (if unlikely) file-name character.
    spellings = [file_name] + ([file_name.replace("\\", "/")] if "\\" in file_name else [])
    for spelling in spellings:
        for base in (root, csv_dir):
            candidate = base / spelling  # an absolute file_name replaces `base`
            if candidate.is_file():
                return Path(os.path.abspath(candidate))
    return None


def _relative_to_root(path: Path, root: Path) -> Optional[str]:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _read_csv_rows(csv_path: Path) -> Tuple[Optional[List[str]], List[Tuple[int, List[str]]]]:
    """(header, [(line number, row), ...]) with blank rows dropped."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as exc:
        raise DataError(f"'{csv_path}' is not UTF-8 text ({exc}); re-save it as UTF-8.") from exc
    except csv.Error as exc:
        raise DataError(f"'{csv_path}' is not a valid CSV file: {exc}") from exc
    return header, rows


def _read_metadata_csv(csv_path: Path, root: Path,
                       warnings: List[str]) -> Dict[str, Tuple[Path, str]]:
    """{rel_path: (path, caption)} for every row; all bad rows are reported in one DataError."""
    header, rows = _read_csv_rows(csv_path)
    file_column, text_column = _metadata_columns(header, csv_path)
    entries: Dict[str, Tuple[Path, str]] = {}
    first_line_of: Dict[str, int] = {}
    problems: List[str] = []
    for row_number, (line, row) in enumerate(rows, start=1):
        where = f"{csv_path.name} row {row_number} (line {line})"
        file_name = row[file_column].strip() if len(row) > file_column else ""
        caption = row[text_column] if len(row) > text_column else ""
        if not file_name:
            problems.append(f"{where}: empty file_name")
            continue
        path = _resolve_listed_file(file_name, root, csv_path.parent)
        if path is None:
            problems.append(f"{where}: file '{file_name}' not found (looked in '{root}'"
                            + (f" and '{csv_path.parent}')" if csv_path.parent != root else ")"))
            continue
        rel_path = _relative_to_root(path, root)
        if rel_path is None:
            problems.append(f"{where}: file '{file_name}' is outside train_data_dir '{root}'")
            continue
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            problems.append(f"{where}: file '{file_name}' is not a supported image "
                            f"(accepted: {_accepted_extensions()})")
            continue
        if rel_path in entries:
            warnings.append(f"{where}: '{rel_path}' is listed again (first on line "
                            f"{first_line_of[rel_path]}); using this later row's caption.")
        first_line_of.setdefault(rel_path, line)
        entries[rel_path] = (path, _normalise_caption(caption))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in '{csv_path}':\n  " + "\n  ".join(problems),
                        problems)
    return entries


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


def _caption_for(rel_path: str, path: Path, csv_entries: Dict[str, Tuple[Path, str]],
                 caption_extension: str, warnings: List[str]) -> Tuple[str, str]:
    if rel_path in csv_entries:
        return csv_entries[rel_path][1], "csv"
    sidecar = _read_sidecar(path, caption_extension, warnings)
    if sidecar is not None:
        return sidecar, "sidecar"
    return "", "none"


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _inspect(candidate: _Candidate, check_images: bool) -> ImageRecord:
    try:
        sha256 = _sha256_of_file(candidate.path)
    except OSError as exc:
        raise UnreadableImage(candidate.path, f"cannot read file ({exc.strerror or exc})") from exc
    if check_images:
        image = load_rgb(candidate.path)
        width, height = image.size
        image.close()
    else:
        width, height = probe_size(candidate.path)
    return ImageRecord(path=str(candidate.path), rel_path=candidate.rel_path,
                       caption=candidate.caption, repeats=candidate.repeats,
                       folder=candidate.folder, sha256=sha256, width=width, height=height,
                       caption_source=candidate.caption_source)


def _inspect_or_report(candidate: _Candidate, check_images: bool):
    try:
        return _inspect(candidate, check_images)
    except UnreadableImage as exc:
        return exc


def _inspect_candidates(candidates: List[_Candidate], check_images: bool
                        ) -> Tuple[List[ImageRecord], List[Tuple[str, str]]]:
    """Hash and check every image: (good records in order, [(rel_path, reason)] of bad ones)."""
    # Pillow decodes and hashlib hashes with the GIL released, so threads give a real speed-up on
    # large datasets; map() keeps the input order, so the result stays deterministic.
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda c: _inspect_or_report(c, check_images), candidates))
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


# ---- message helpers -----------------------------------------------------------------------------

def _accepted_extensions() -> str:
    return ", ".join(sorted(SUPPORTED_EXTENSIONS))


def _some_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_IN_A_MESSAGE])
    hidden = len(names) - _NAMES_IN_A_MESSAGE
    return shown + (f" (and {hidden} more)" if hidden > 0 else "")
