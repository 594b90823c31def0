"""Aspect-ratio buckets: train non-square images without squashing or cropping away half of them.

A bucket is a (width, height) whose area is at most resolution², both sides multiples of
`step`. Each image goes to the bucket with the closest aspect ratio, is resized to cover it and
cropped; a batch only ever holds images of one bucket.
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    min_reso: int
    max_reso: int
    step: int

    @classmethod
    def for_resolution(cls, resolution: int, step: int = 64, min_reso: int | None = None,
                       max_reso: int | None = None) -> "BucketSpec":
        low = min_reso or max(step, (resolution // 2) // step * step)
        return cls(resolution, low, max_reso or resolution * 2, step)

    @classmethod
    def from_config(cls, cfg) -> "BucketSpec":
        return cls.for_resolution(cfg.resolution, cfg.bucket_reso_steps, cfg.min_bucket_reso,
                                  cfg.max_bucket_reso)


def make_buckets(spec: BucketSpec) -> list[tuple[int, int]]:
    """All (w, h) with w*h <= resolution², sides in [min, max] and multiples of step, keeping for
    each width the tallest height that fits (so no bucket wastes area)."""
    max_area = spec.resolution * spec.resolution
    buckets = set()
    width = spec.min_reso
    while width <= spec.max_reso:
        height = min(spec.max_reso, (max_area // width) // spec.step * spec.step)
        if height >= spec.min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += spec.step
    square = (spec.resolution // spec.step * spec.step,) * 2
    buckets.add(square)
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 errors weigh the same);
    ties go to the larger area."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@functools.lru_cache(maxsize=32)
def default_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    return tuple(make_buckets(BucketSpec.for_resolution(resolution)))


def bucket_for(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket an image trains in with the default bucket settings (used by check-data)."""
    return assign_bucket(width, height, list(default_buckets(resolution)))


def upscale_factor(width: int, height: int, bucket: tuple[int, int]) -> float:
    """How much the image must be enlarged to cover its bucket (1.0 or less: no upscaling)."""
    return max(bucket[0] / width, bucket[1] / height)


@dataclass
class BucketPlan:
    spec: BucketSpec
    per_record: list[tuple[int, int]]     # bucket of each dataset record

    @classmethod
    def for_index(cls, index, spec: BucketSpec, enabled: bool = True) -> "BucketPlan":
        square = (spec.resolution, spec.resolution)
        if not enabled:
            return cls(spec, [square] * len(index.records))
        buckets = make_buckets(spec)
        return cls(spec, [assign_bucket(r.width, r.height, buckets) for r in index.records])

    def counts(self, index) -> dict[tuple[int, int], int]:
        """Samples (images x repeats) per bucket."""
        counts: Counter = Counter()
        for record, bucket in zip(index.records, self.per_record):
            counts[bucket] += record.repeats
        return dict(sorted(counts.items()))

    def upscaled(self, index, max_factor: float) -> list[tuple[str, float]]:
        out = []
        for record, bucket in zip(index.records, self.per_record):
            factor = upscale_factor(record.width, record.height, bucket)
            if factor > max_factor:
                out.append((record.rel_path, factor))
        return out

    def describe(self, index) -> str:
        return ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.counts(index).items())

    def metadata(self, index) -> dict:
        """kohya's `ss_bucket_info` shape."""
        errors = [abs(r.width / r.height - b[0] / b[1]) for r, b in zip(index.records, self.per_record)]
        return {"buckets": {str(i): {"resolution": [w, h], "count": n}
                            for i, ((w, h), n) in enumerate(self.counts(index).items())},
                "mean_img_ar_error": sum(errors) / max(1, len(errors))}
