"""Tag vocabularies for auto-labeling: plain-text lists, one tag per line, one file per category.

The shipped lists are in `vocab/`; `--vocab FILE` adds a category named after the file (or extends
the shipped category of the same name). Lines starting with '#' are comments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List

VOCAB_DIR = Path(__file__).parent / "vocab"
# Captions read best subject-first; categories not listed here follow in file-name order.
CATEGORY_ORDER = ("subject", "setting", "composition", "style", "medium", "lighting", "colour")


def read_tags(path: Path) -> List[str]:
    tags: List[str] = []
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        tag = line.strip()
        if tag and not tag.startswith("#") and tag not in tags:
            tags.append(tag)
    return tags


def load_vocabulary(extra_files: Iterable = (), include_shipped: bool = True) -> Dict[str, List[str]]:
    """{category: [tags]} in caption order."""
    files = sorted(VOCAB_DIR.glob("*.txt"), key=_category_rank) if include_shipped else []
    vocabulary: Dict[str, List[str]] = {}
    for path in list(files) + [Path(p) for p in extra_files]:
        tags = vocabulary.setdefault(path.stem, [])
        tags += [tag for tag in read_tags(path) if tag not in tags]
    empty = [name for name, tags in vocabulary.items() if not tags]
    if empty:
        raise ValueError(f"vocabulary file(s) without tags: {', '.join(empty)}")
    return vocabulary


def _category_rank(path: Path):
    name = path.stem
    return (CATEGORY_ORDER.index(name) if name in CATEGORY_ORDER else len(CATEGORY_ORDER), name)
