"""Fast dataset checks that need only what discovery already knows (sizes, captions), plus the
gate that training runs before it starts. The slow checks (decode, duplicates, blur) live in
`full_check.py`; severity rules are in `findings.py`."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..data.captions import split_tags
from ..data.discovery import DataError
from .findings import ERROR, INFO, WARNING, Finding, errors, warnings

# SD's text encoder sees 77 tokens: <start>, 75 caption tokens, <end>. Anything after is cut off.
CAPTION_TOKEN_WINDOW = 75
# An image this many times smaller than the resolution is mush after upscaling: an error.
TINY_UPSCALE_FACTOR = 4
_TAIL_CHARS = 60


@dataclass
class CheckOptions:
    resolution: int = 512
    blur_threshold: float = 30.0         # variance of Laplacian at the training resolution; below = blurry
    max_aspect_ratio: float = 4.0        # long side / short side; above = mostly cropped away
    near_duplicate_distance: int = 6     # differing bits of the 64-bit perceptual hash
    top_tags: int = 20


# ---- per-image checks ------------------------------------------------------------------------------

def size_findings(rel_path: str, width: int, height: int, options: CheckOptions) -> List[Finding]:
    found = []
    short, long = min(width, height), max(width, height)
    if short * TINY_UPSCALE_FACTOR <= options.resolution:
        found.append(Finding(ERROR, "tiny_image", f"{width}x{height} is far too small for the "
                             f"{options.resolution} px training resolution (upscaled about "
                             f"{options.resolution / short:.0f}x, it trains as a blurry mess). "
                             "Remove it or use a larger version.", [rel_path]))
    elif short < options.resolution:
        found.append(Finding(WARNING, "small_image", f"{width}x{height}: the short side is below the "
                             f"{options.resolution} px training resolution, so it is upscaled and "
                             "trains softer than the others.", [rel_path]))
    if long > options.max_aspect_ratio * short:
        found.append(Finding(WARNING, "extreme_aspect", f"{width}x{height} (aspect {long / short:.1f}:1,"
                             f" limit {options.max_aspect_ratio:g}:1): training crops much of it away; "
                             "crop it into parts yourself.", [rel_path]))
    return found


def caption_findings(record, token_count: Optional[int], tail: str) -> List[Finding]:
    if record.caption_source == "none":
        return [Finding(WARNING, "missing_caption", "no caption (no sidecar file, no metadata.csv "
                        "row): it trains unconditioned. Write one, or run `lora-trainer label`.",
                        [record.rel_path])]
    if not record.caption.strip():
        return [Finding(WARNING, "empty_caption", "the caption is empty: it trains unconditioned.",
                        [record.rel_path])]
    if token_count is not None and token_count > CAPTION_TOKEN_WINDOW:
        return [Finding(WARNING, "long_caption", f"caption is {token_count} tokens; the text "
                        f"encoder reads {CAPTION_TOKEN_WINDOW}, so it ignores everything from "
                        f"'{_shorten(tail)}'", [record.rel_path])]
    return []


def _shorten(text: str) -> str:
    return text if len(text) <= _TAIL_CHARS else text[:_TAIL_CHARS - 3] + "..."


# ---- caption tokens ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _tokenizer():
    from ..backbones.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def caption_tokens(captions: Sequence[str]):
    """(token counts, text beyond the window) per caption, with SD's real CLIP tokenizer.

    Raises whatever building the tokenizer raises (e.g. open_clip's BPE file missing).
    """
    counts = [len(row) for row in _token_ids(captions)]
    tails = [_ignored_tail(c) if n > CAPTION_TOKEN_WINDOW else "" for c, n in zip(captions, counts)]
    return counts, tails


def _token_ids(texts: Sequence[str]) -> List[List[int]]:
    # verbose=False: we measure long captions on purpose; no "sequence too long" warning per call.
    return _tokenizer()(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _ignored_tail(caption: str) -> str:
    """The caption from the tag that crosses the window on, as the user wrote it.

    Decoding the token ids would not do: CLIP's BPE splits digits and drops the original spacing.
    Counting tag by tag plus one token per comma matches the real count except where punctuation
    touches a comma ("(tag)," can be one token less), so the quoted cut may be one tag early.
    """
    tags = split_tags(caption)
    used = 0
    for position, ids in enumerate(_token_ids(tags)):
        used += len(ids) + (1 if position else 0)
        if used > CAPTION_TOKEN_WINDOW:
            return ", ".join(tags[position:])
    return ""


def _caption_tokens_or_reason(records):
    try:
        counts, tails = caption_tokens([r.caption for r in records])
        return counts, tails, None
    except Exception as exc:  # a missing tokenizer must not stop a data check or a training run
        reason = f"caption lengths not checked: the CLIP tokenizer is unavailable ({exc})"
        return [None] * len(records), [""] * len(records), reason


# ---- what several callers share -------------------------------------------------------------------

def record_findings(records, options: CheckOptions):
    """Size and caption findings for discovered records, and each record's token count."""
    counts, tails, tokenizer_problem = _caption_tokens_or_reason(records)
    found: List[Finding] = []
    for record, count, tail in zip(records, counts, tails):
        found += size_findings(record.rel_path, record.width, record.height, options)
        found += caption_findings(record, count, tail)
    if tokenizer_problem:
        found.append(Finding(INFO, "tokenizer_unavailable", tokenizer_problem))
    return found, counts


def quick_check(index, cfg) -> List[Finding]:
    """The fast subset, run before training: tiny images, aspect, missing/empty/over-long captions.

    Unreadable images are already handled by discovery (bad_image_policy). No image is decoded.
    """
    found, _counts = record_findings(index.records, CheckOptions(resolution=cfg.resolution))
    return found


# ---- the training gate ----------------------------------------------------------------------------

def check_before_training(index, cfg, log: Optional[logging.Logger] = None,
                          found: Optional[List[Finding]] = None) -> List[Finding]:
    """Run quick_check (unless its `found` findings are passed in); log warnings (when `log` is
    given) and raise DataError on errors.

    Returns the findings so a UI can show them.
    """
    if found is None:
        found = quick_check(index, cfg)
    if log is not None:
        for line in summarize(warnings(found)):
            log.warning("data check: %s", line)
    blocking = errors(found)
    if blocking:
        raise DataError(f"The data check found {len(blocking)} error(s):\n  "
                        + "\n  ".join(summarize(blocking))
                        + "\nFix them, or set `check_data: false` (--no-check-data) to train anyway. "
                        "`lora-trainer check-data` writes a full report.",
                        [describe(f) for f in blocking])
    return found


def describe(finding: Finding) -> str:
    """One line: the files, then the message."""
    return f"{', '.join(finding.files)}: {finding.message}" if finding.files else finding.message


def summarize(findings: Sequence[Finding], per_check: int = 5) -> List[str]:
    """One line per finding, but at most `per_check` per check: a dataset with 300 uncaptioned
    images gets 5 lines and "... and 295 more", not 300 lines in the training log."""
    lines: List[str] = []
    by_code: Dict[str, List[Finding]] = {}
    for finding in findings:
        by_code.setdefault(finding.code, []).append(finding)
    for code, group in by_code.items():
        lines += [describe(f) for f in group[:per_check]]
        if len(group) > per_check:
            hidden = [path for f in group[per_check:] for path in f.files]
            lines.append(f"... and {len(group) - per_check} more {code} ({', '.join(hidden[:5])}"
                         + (", ..." if len(hidden) > 5 else "") + ")")
    return lines
