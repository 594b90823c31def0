"""`check-data`: every check on a dataset folder, with per-image numbers for the report.

One header-only discovery pass (captions, repeats, sha256), then one reduced-size decode per
image (in threads: Pillow releases the GIL) for corruption, the perceptual hash, sharpness and
the thumbnail. No model is loaded; only the CLIP tokenizer.
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..data.captions import top_tags
from ..data.discovery import REPEAT_FOLDER_PATTERN, discover
from ..data.images import SUPPORTED_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS, UnreadableImage, load_rgb
from ..data.buckets import bucket_for
from .checks import CAPTION_TOKEN_WINDOW, CheckOptions, record_findings
from .findings import ERROR, INFO, WARNING, Finding, by_severity
from .imagestats import ImageStats, analyse_image

# Discovery warnings that our per-file findings already say better (so they are not repeated).
_COVERED_DISCOVERY_WARNINGS = re.compile(
    r"^(Skipped unreadable image |Ignored \d+ file\(s\) in unsupported"
    r"|\d+ image\(s\) have (no|an empty) caption)")
_IGNORED_DIR_NAMES = frozenset({"__MACOSX"})  # as discovery: zip-tool metadata, never images


@dataclass
class ImageReport:
    rel_path: str
    width: int
    height: int
    repeats: int
    folder: str
    caption: str
    caption_tokens: Optional[int] = None
    bucket: Optional[Tuple[int, int]] = None
    sharpness: Optional[float] = None
    phash: Optional[str] = None                         # 16 hex digits
    thumbnail: Optional[bytes] = field(default=None, repr=False)  # JPEG; HTML only, not in JSON


@dataclass
class CheckResult:
    root: str
    options: CheckOptions
    findings: List[Finding]
    images: List[ImageReport]
    summary: dict
    elapsed_s: float = 0.0


def check_dataset(train_data_dir, options: CheckOptions, metadata_path=None,
                  caption_extension: str = ".txt", default_repeats: int = 1) -> CheckResult:
    """Run every check. Raises DataError only when there is nothing to check (see discover)."""
    started = time.perf_counter()
    index = discover(train_data_dir, metadata_path=metadata_path, caption_extension=caption_extension,
                     default_repeats=default_repeats, bad_image_policy="skip", check_images=False)
    root = Path(index.root)
    found = _discovery_findings(index.warnings)
    found += _files_outside_index(root, {r.rel_path for r in index.records})

    stats, unreadable = _analyse_all(index.records, options.resolution)
    found += unreadable
    usable = [r for r in index.records if r.rel_path in stats]
    per_record, token_counts = record_findings(usable, options)
    found += per_record
    found += exact_duplicates(usable)
    found += near_duplicates(usable, stats, options.near_duplicate_distance)
    found += _blur_findings(usable, stats, options.blur_threshold)

    images = _image_reports(usable, stats, token_counts, options.resolution)
    summary = _summary(usable, images, options)
    found += _summary_findings(summary)
    return CheckResult(str(root), options, by_severity(found), images, summary,
                       time.perf_counter() - started)


# ---- files discovery did not index -------------------------------------------------------------

def _discovery_findings(discovery_warnings: List[str]) -> List[Finding]:
    return [Finding(WARNING, "discovery", text) for text in discovery_warnings
            if not _COVERED_DISCOVERY_WARNINGS.match(text)]


def _files_outside_index(root: Path, indexed: set) -> List[Finding]:
    """Unsupported formats, and supported files discovery skipped because they are unreadable."""
    found = []
    for rel_path, suffix in _walk_files(root):
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
            found.append(Finding(WARNING, "unsupported_format", f"{suffix} files are not trained on; "
                                 "convert it to PNG or JPEG.", [rel_path]))
        elif suffix in SUPPORTED_EXTENSIONS and rel_path not in indexed and not _zero_repeats(rel_path):
            # Discovery skipped it, so its header is unreadable; load_rgb says why.
            try:
                load_rgb(root / rel_path)
            except UnreadableImage as exc:
                found.append(_unreadable(rel_path, exc.reason))
    return found


def _zero_repeats(rel_path: str) -> bool:
    """In a "0_name" folder (the nearest N_ folder wins): excluded on purpose, not unreadable."""
    for part in reversed(PurePosixPath(rel_path).parts[:-1]):
        match = REPEAT_FOLDER_PATTERN.match(part)
        if match:
            return int(match.group(1)) == 0
    return False


def _walk_files(root: Path):
    for directory, dir_names, file_names in os.walk(root):
        # Hidden entries are never training data (the same rule as discovery).
        dir_names[:] = sorted(d for d in dir_names if not d.startswith(".") and d not in _IGNORED_DIR_NAMES)
        for name in sorted(file_names):
            if not name.startswith("."):
                path = Path(directory) / name
                yield path.relative_to(root).as_posix(), path.suffix.lower()


def _unreadable(rel_path: str, reason: str) -> Finding:
    return Finding(ERROR, "unreadable", f"cannot be decoded: {reason}. Re-export or delete it.", [rel_path])


# ---- decoding every image ------------------------------------------------------------------------

def _analyse_all(records, working_side: int) -> Tuple[Dict[str, ImageStats], List[Finding]]:
    def analyse(record):
        try:
            return analyse_image(record.path, working_side)
        except UnreadableImage as exc:
            return exc

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(analyse, records))
    stats, found = {}, []
    for record, result in zip(records, results):
        if isinstance(result, UnreadableImage):
            found.append(_unreadable(record.rel_path, result.reason))
        else:
            stats[record.rel_path] = result
    return stats, found


# ---- duplicates and blur -------------------------------------------------------------------------

def exact_duplicates(records) -> List[Finding]:
    groups: Dict[str, List[str]] = defaultdict(list)
    for record in records:
        groups[record.sha256].append(record.rel_path)
    return [Finding(WARNING, "exact_duplicate", f"{len(files)} identical files: this picture trains "
                    f"{len(files)}x as often as the others. Keep one.", files)
            for files in groups.values() if len(files) > 1]


def near_duplicates(records, stats: Dict[str, ImageStats], max_distance: int) -> List[Finding]:
    """Groups of different files whose perceptual hashes differ in <= max_distance bits."""
    unique = list({r.sha256: r for r in records}.values())  # exact copies are reported above
    hashes = np.array([stats[r.rel_path].phash for r in unique], dtype=np.uint64)
    parent = list(range(len(unique)))

    def root_of(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(unique) - 1):
        distances = _popcount(hashes[i] ^ hashes[i + 1:])
        for j in np.nonzero(distances <= max_distance)[0]:
            parent[root_of(i + 1 + int(j))] = root_of(i)
    groups: Dict[int, List[str]] = defaultdict(list)
    for i, record in enumerate(unique):
        groups[root_of(i)].append(record.rel_path)
    return [Finding(WARNING, "near_duplicate", f"{len(files)} images look almost the same "
                    "(resized, re-encoded or lightly edited copies?): the picture is overweighted. "
                    "Keep the best one.", sorted(files))
            for files in groups.values() if len(files) > 1]


def _popcount(values: np.ndarray) -> np.ndarray:
    # np.bitwise_count needs numpy 2; the WebUI may still run numpy 1.x.
    return np.unpackbits(values.view(np.uint8)).reshape(-1, 64).sum(axis=1)


def _blur_findings(records, stats: Dict[str, ImageStats], threshold: float) -> List[Finding]:
    return [Finding(WARNING, "blurry", f"likely blurry: sharpness {stats[r.rel_path].sharpness:.0f} "
                    f"< {threshold:g} (variance of the Laplacian at the training resolution). If it "
                    "is soft on purpose, ignore this or lower --blur-threshold.", [r.rel_path])
            for r in records if stats[r.rel_path].sharpness < threshold]


# ---- statistics ----------------------------------------------------------------------------------

def _image_reports(records, stats, token_counts, resolution: int) -> List[ImageReport]:
    return [ImageReport(r.rel_path, r.width, r.height, r.repeats, r.folder, r.caption, tokens,
                        bucket_for(r.width, r.height, resolution), round(stats[r.rel_path].sharpness, 1),
                        f"{stats[r.rel_path].phash:016x}", stats[r.rel_path].thumbnail_jpeg)
            for r, tokens in zip(records, token_counts)]


def _summary(records, images: List[ImageReport], options: CheckOptions) -> dict:
    folders: Dict[Tuple[int, str], int] = Counter((r.repeats, r.folder) for r in records)
    # every report has its bucket (_image_reports sets it)
    buckets = Counter(f"{i.bucket[0]}x{i.bucket[1]}" for i in images if i.bucket is not None)
    tokens = [i.caption_tokens for i in images if i.caption_tokens is not None]
    return {
        "images": len(records),
        "epoch_size": sum(r.repeats for r in records),
        "resolution": options.resolution,
        "folders": [{"folder": f"{repeats}_{folder}" if folder else "(top level)", "images": count,
                     "repeats": repeats, "samples": count * repeats}
                    for (repeats, folder), count in sorted(folders.items(), key=lambda kv: kv[0][1])],
        "top_tags": [[tag, count] for tag, count in top_tags(records, options.top_tags)],
        "buckets": [{"bucket": name, "images": count} for name, count in buckets.most_common()],
        "caption_tokens": {"max": max(tokens, default=0),
                           "mean": round(sum(tokens) / len(tokens), 1) if tokens else 0,
                           "over_window": sum(t > CAPTION_TOKEN_WINDOW for t in tokens)},
    }


def _summary_findings(summary: dict) -> List[Finding]:
    found = [Finding(INFO, "epoch_size", f"{summary['images']} images, {summary['epoch_size']} "
                     "samples per epoch (each image counted once per repeat).")]
    for entry in summary["folders"]:
        found.append(Finding(INFO, "repeat_folder", f"{entry['folder']}: {entry['images']} images x "
                             f"{entry['repeats']} repeats = {entry['samples']} samples"))
    if summary["top_tags"]:
        tags = ", ".join(f"{tag} ({count})" for tag, count in summary["top_tags"])
        found.append(Finding(INFO, "top_tags", f"most frequent tags: {tags}"))
    buckets = ", ".join(f"{b['bucket']}: {b['images']}" for b in summary["buckets"])
    found.append(Finding(INFO, "buckets", f"aspect buckets at {summary['resolution']} px: {buckets}"))
    tokens = summary["caption_tokens"]
    found.append(Finding(INFO, "caption_tokens", f"caption length: max {tokens['max']}, mean "
                         f"{tokens['mean']} tokens (the window is {CAPTION_TOKEN_WINDOW})"))
    return found
