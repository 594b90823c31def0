"""Caption tags: splitting, per-sample shuffle/dropout augmentation, and tag statistics."""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, List, Tuple


def split_tags(caption: str) -> List[str]:
    """Comma-separated caption -> stripped, non-empty tags ("a, b,, c" -> ["a", "b", "c"])."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(caption: str, *, shuffle: bool, keep_tokens: int, dropout_rate: float,
                    rng: random.Random) -> str:
    """Apply caption augmentation for one training sample (kohya semantics).

    - With probability `dropout_rate` the sample trains unconditioned: returns "".
    - With `shuffle`, the first `keep_tokens` tags (typically the trigger word) stay in place and
      the remaining tags are shuffled, so the model does not learn the tag order.
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate}")
    # Draw the dropout number first and unconditionally: the decision for a sample then depends
    # only on the rng's seed, not on the caption's content or on whether dropout is enabled.
    dropout_draw = rng.random()
    if dropout_draw < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def top_tags(records: Iterable, n: int) -> List[Tuple[str, int]]:
    """The `n` most common tags as (tag, number of images whose caption has it).

    Counted once per image and unweighted by repeats: this answers "what is my dataset about",
    which is what a UI summary wants. Ties are broken alphabetically so the list is stable.
    """
    counts: Counter = Counter()
    for record in records:
        counts.update(set(split_tags(record.caption)))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:max(n, 0)]
