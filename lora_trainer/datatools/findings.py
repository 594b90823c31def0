"""What a data check reports: findings with a severity, and the rule for what blocks training.

Severity rules (also in `lora-trainer check-data --help`):
  error    training would fail or learn garbage: unreadable/corrupt images, images so small that
           they are upscaled 4x or more to the training resolution. Training refuses to start
           (discovery stops on unreadable images unless `bad_image_policy: skip`; the data check
           stops on tiny ones unless `check_data: false`), and `check-data --strict` exits with 1.
  warning  probably a mistake, but training works: small images, extreme aspect ratios, exact and
           near duplicates, likely blurry images, missing/empty captions, captions longer than
           the 75-token window, ignored files in unsupported formats, discovery's own warnings.
           They are heuristics (blur, near duplicates) or judgement calls, so nothing fails on them.
  info     statistics: epoch size, images per repeat folder, most frequent tags, aspect buckets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, List

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES = (ERROR, WARNING, INFO)  # most severe first: the order reports use


@dataclass
class Finding:
    severity: str
    code: str                 # stable machine name, e.g. "tiny_image" (for JSON consumers and tests)
    message: str              # one line a user can act on
    files: List[str] = field(default_factory=list)  # rel paths involved (a duplicate group, ...)

    def to_dict(self) -> dict:
        return asdict(self)


def by_severity(findings: Iterable[Finding]) -> List[Finding]:
    """Errors first, then warnings, then info; stable within a level."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def errors(findings: Iterable[Finding]) -> List[Finding]:
    return [f for f in findings if f.severity == ERROR]


def warnings(findings: Iterable[Finding]) -> List[Finding]:
    return [f for f in findings if f.severity == WARNING]
