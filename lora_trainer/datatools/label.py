"""`lora-trainer label`: caption a folder by zero-shot CLIP tagging, into metadata.csv and/or .txt.

Each image is ranked against every tag of each vocabulary category (softmax within the category);
the top-k tags per category above the threshold make the caption, after the trigger word.
Existing non-empty captions are kept (and reported) unless overwrite is set.
"""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..data.discovery import METADATA_FILE_NAME, discover
from ..data.images import UnreadableImage, load_rgb

# Averaging a few phrasings makes a tag's text embedding less sensitive to the wording.
PROMPT_TEMPLATES = ("a photo of {}.", "an image of {}.", "{}")
WRITE_MODES = ("csv", "txt", "both")

# images -> one list of tags per image
Tagger = Callable[[list], List[List[str]]]


@dataclass
class LabelOptions:
    trigger: Optional[str] = None
    batch_size: int = 16
    write: str = "csv"
    overwrite: bool = False
    progress: bool = True


@dataclass
class LabelResult:
    labeled: Dict[str, str] = field(default_factory=dict)    # rel_path -> new caption
    kept: List[str] = field(default_factory=list)            # had a caption; left alone
    unreadable: List[str] = field(default_factory=list)      # "rel_path: reason"
    written: List[str] = field(default_factory=list)         # files written
    notes: List[str] = field(default_factory=list)


# ---- captions for one folder ---------------------------------------------------------------------

def label_folder(folder, tagger: Tagger, options: LabelOptions) -> LabelResult:
    """Caption every image of `folder` that has no caption (all of them with overwrite)."""
    if options.write not in WRITE_MODES:
        raise ValueError(f"write must be one of {WRITE_MODES}, got {options.write!r}")
    index = discover(folder, bad_image_policy="skip", check_images=False)
    result = LabelResult()
    todo = []
    for record in index.records:
        if record.caption.strip() and not options.overwrite:
            result.kept.append(record.rel_path)
        else:
            todo.append(record)
    result.notes += [w for w in index.warnings if w.startswith("Skipped unreadable image")]
    _caption_records(todo, tagger, options, result)
    root = Path(index.root)
    if options.write in ("csv", "both") and result.labeled:
        result.written.append(str(write_metadata_csv(root, result.labeled)))
    if options.write in ("txt", "both"):
        result.written += [str(p) for p in write_sidecars(root, result.labeled)]
    if options.write == "txt":
        result.notes += _csv_shadowing_notes(index.records, result.labeled)
    return result


def _caption_records(records, tagger: Tagger, options: LabelOptions, result: LabelResult) -> None:
    from tqdm import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with tqdm(total=len(records), unit="img", desc="labeling", disable=not options.progress) as bar, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(records), options.batch_size):
            batch = records[start:start + options.batch_size]
            loaded = list(pool.map(_load_or_reason, batch))  # decoding in threads overlaps the I/O
            good = [(r, image) for r, image in zip(batch, loaded) if not isinstance(image, str)]
            result.unreadable += [f"{r.rel_path}: {image}" for r, image in zip(batch, loaded)
                                  if isinstance(image, str)]
            if good:
                for (record, _), tags in zip(good, tagger([image for _, image in good])):
                    result.labeled[record.rel_path] = make_caption(options.trigger, tags)
            bar.update(len(batch))


def _load_or_reason(record):
    try:
        return load_rgb(record.path)
    except UnreadableImage as exc:
        return exc.reason


def make_caption(trigger: Optional[str], tags: Sequence[str]) -> str:
    """"trigger, tag, tag": the trigger first so keep_tokens=1 keeps it in place when shuffling."""
    parts = [trigger.strip()] if trigger and trigger.strip() else []
    parts += [t for t in tags if t not in parts]
    return ", ".join(parts)


# ---- writing ---------------------------------------------------------------------------------------

def write_metadata_csv(root: Path, captions: Dict[str, str]) -> Path:
    """Merge `captions` into root/metadata.csv: rows for those files are replaced, other rows (and
    columns) are kept as they were, new files are appended. Written atomically."""
    path = root / METADATA_FILE_NAME
    header, rows = _read_csv(path)
    file_column = header.index("file_name")
    text_column = header.index("text") if "text" in header else header.index("caption")
    remaining = dict(captions)
    for row in rows:
        rel_path = _rel_path_of(row[file_column], root)
        if rel_path in remaining:
            row[text_column] = remaining.pop(rel_path)
    for rel_path, caption in remaining.items():
        row = [""] * len(header)
        row[file_column], row[text_column] = rel_path, caption
        rows.append(row)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)  # quotes captions with commas/quotes/newlines as needed
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(partial, path)
    return path


def _read_csv(path: Path):
    if not path.is_file():
        return ["file_name", "text"], []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle)]
    header = [cell.strip().lower() for cell in rows[0]] if rows else ["file_name", "text"]
    width = len(header)
    body = [row + [""] * (width - len(row)) for row in rows[1:] if any(c.strip() for c in row)]
    return header, body


def _rel_path_of(file_name: str, root: Path) -> Optional[str]:
    candidate = Path(os.path.abspath(root / file_name.strip().replace("\\", "/")))
    try:
        return candidate.relative_to(root).as_posix()
    except ValueError:
        return None


def write_sidecars(root: Path, captions: Dict[str, str], extension: str = ".txt") -> List[Path]:
    written = []
    for rel_path, caption in captions.items():
        path = (root / rel_path).with_suffix(extension)
        path.write_text(caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def _csv_shadowing_notes(records, labeled: Dict[str, str]) -> List[str]:
    # metadata.csv rows win over .txt files, so a new sidecar is ignored while such a row exists.
    shadowed = [r.rel_path for r in records if r.caption_source == "csv" and r.rel_path in labeled]
    if not shadowed:
        return []
    return [f"{len(shadowed)} image(s) have a row in metadata.csv, which wins over the new .txt "
            f"files: {', '.join(shadowed[:5])}. Use --write both, or remove those rows."]


# ---- CLIP zero-shot tagging -----------------------------------------------------------------------

class ZeroShotTagger:
    """Ranks images against each vocabulary category with a loaded open_clip model."""

    def __init__(self, clip, vocabulary: Dict[str, List[str]], top_k: int, threshold: float,
                 text_batch_size: int = 64):
        self.clip, self.top_k, self.threshold = clip, top_k, threshold
        self.vocabulary = vocabulary
        self.text_features = {category: self._encode_tags(tags, text_batch_size)
                              for category, tags in vocabulary.items()}

    def __call__(self, images: list) -> List[List[str]]:
        import torch

        with torch.inference_mode():
            pixels = torch.stack([self.clip.preprocess(image) for image in images]).to(self.clip.device)
            features = torch.nn.functional.normalize(self.clip.model.encode_image(pixels).float(), dim=-1)
            scale = self.clip.model.logit_scale.exp().float()
            per_category = {c: (scale * features @ t.T).softmax(dim=-1).cpu()
                            for c, t in self.text_features.items()}
        return [self._pick(per_category, row) for row in range(len(images))]

    def _pick(self, per_category, row: int) -> List[str]:
        tags = []
        for category, probabilities in per_category.items():
            ranked = probabilities[row].sort(descending=True)
            for probability, index in zip(ranked.values[:self.top_k], ranked.indices[:self.top_k]):
                if float(probability) >= self.threshold:
                    tags.append(self.vocabulary[category][int(index)])
        return tags

    def _encode_tags(self, tags: List[str], batch_size: int):
        import torch

        prompts = [template.format(tag) for tag in tags for template in PROMPT_TEMPLATES]
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                tokens = self.clip.tokenizer(prompts[start:start + batch_size]).to(self.clip.device)
                chunks.append(self.clip.model.encode_text(tokens).float())
        embeddings = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)
        per_tag = embeddings.view(len(tags), len(PROMPT_TEMPLATES), -1).mean(dim=1)
        return torch.nn.functional.normalize(per_tag, dim=-1)


def auto_label(folder, options: LabelOptions, model_path=None, model_name: Optional[str] = None,
               cache_dir=None, device: str = "auto", vocab_files: Sequence[str] = (), top_k: int = 2,
               threshold: float = 0.1) -> LabelResult:
    """The seed's auto_label: a local open_clip model ranks each image against the tag vocabularies.
    Raises clip_model.ModelNotFound (with how to provide a model), ValueError or DataError."""
    from .clip_model import load_clip, resolve_model
    from .vocabulary import load_vocabulary

    vocabulary = load_vocabulary(list(vocab_files))  # before the model: a typo should fail fast
    clip = load_clip(resolve_model(model_path, model_name, cache_dir), device)
    return label_folder(folder, ZeroShotTagger(clip, vocabulary, top_k, threshold), options)
