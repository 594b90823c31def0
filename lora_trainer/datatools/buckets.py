"""Which aspect bucket an image would train in (the simple SD rule; the trainer may replace it).

Buckets have about resolution^2 pixels, sides that are multiples of 64 and lie between 256 (or
the resolution, if smaller) and 2 x resolution. An image goes to the bucket with the closest
aspect ratio (compared on a log scale, so 2:1 and 1:2 are equally far from 1:1).
"""
from __future__ import annotations

import functools
import math
from typing import List, Tuple

STEP = 64
MIN_SIDE = 256


@functools.lru_cache(maxsize=16)
def sd_buckets(resolution: int) -> Tuple[Tuple[int, int], ...]:
    """All (width, height) buckets for `resolution`, sorted by width."""
    max_area = resolution * resolution
    min_side, max_side = min(MIN_SIDE, resolution), 2 * resolution
    buckets: List[Tuple[int, int]] = []
    for width in range(_round_up(min_side), max_side + 1, STEP):
        height = (max_area // width) // STEP * STEP  # the largest height that keeps the area
        if min_side <= height <= max_side:
            buckets.append((width, height))
    return tuple(sorted(set(buckets))) or ((resolution, resolution),)


def bucket_for(width: int, height: int, resolution: int) -> Tuple[int, int]:
    aspect = math.log(width / height)
    return min(sd_buckets(resolution), key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def _round_up(value: int) -> int:
    return -(-value // STEP) * STEP
