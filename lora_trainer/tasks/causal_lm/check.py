"""The causal-LM data check: `lora-trainer check-data` on a causal_lm config, and the quick check
before training. Severity rules as for images (datatools/findings.py):
  error    the run cannot use the sample: malformed JSON line, missing role, chat-template error,
           nothing to learn (empty, all prompt), longer than max_seq_length with overlong_samples: fail
  warning  truncated samples (overlong_samples: truncate), exact duplicates, empty message contents
  info     token-length histogram, counts
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from ...datatools.findings import ERROR, INFO, WARNING, Finding, errors, warnings
from .records import LMDataError

HISTOGRAM_BINS = 10


def histogram(lengths: list[int], bins: int = HISTOGRAM_BINS) -> list[tuple[int, int, int]]:
    """(low, high, count) bins of equal width over [1, max]."""
    if not lengths:
        return []
    top = max(lengths)
    width = max(1, -(-top // bins))
    counts = Counter((n - 1) // width for n in lengths)
    return [(b * width + 1, (b + 1) * width, counts.get(b, 0)) for b in range(-(-top // width))]


def _sample_warnings(samples) -> list[Finding]:
    found = []
    truncated = [s for s in samples if s.truncated]
    if truncated:
        found.append(Finding(WARNING, "truncated", f"{len(truncated)} sample(s) longer than max_seq_length "
                             "are truncated (the cut-off tokens are not trained)",
                             [f"{s.source} ({s.original_length} tokens)" for s in truncated]))
    groups: dict = {}
    for s in samples:
        groups.setdefault((s.input_ids, s.trainable), []).append(s.source)
    for sources in groups.values():
        if len(sources) > 1:
            found.append(Finding(WARNING, "duplicate", f"{len(sources)} identical samples", sources))
    return found


def _raw_warnings(raw_samples) -> list[Finding]:
    empty = [s.source for s in raw_samples
             if (s.kind == "messages" and any(not c.strip() for _, c in s.messages))
             or (s.kind == "prompt" and not s.completion.strip())]
    return [Finding(WARNING, "empty", "empty message content or completion", empty)] if empty else []


def check_before_training(index, cfg, logger=None, found=None) -> list[Finding]:
    """The index holds only usable samples (errors stopped indexing); log what is worth a look."""
    found = found if found is not None else _sample_warnings(index.samples)
    if logger is not None:
        for f in warnings(found):
            shown = ", ".join(f.files[:5]) + (" ..." if len(f.files) > 5 else "")
            logger.warning("data check: %s: %s", f.message, shown)
    return found


def full_check(cfg) -> dict:
    """Everything about the data, without stopping at the first problem: findings + histogram."""
    from .encode import Encoder, encode_each
    from .model import load_tokenizer
    from .records import collect_samples

    tokenizer = load_tokenizer(Path(cfg.base_model))
    raw, problems = collect_samples(cfg.train_data_dir)
    # measure every sample at full length; overlong ones are errors only under overlong_samples: fail
    encoder = Encoder(tokenizer, cfg.train_on, cfg.max_seq_length, "truncate")
    samples, encode_problems = encode_each(encoder, raw)
    found = [Finding(ERROR, "bad_sample", p.split(": ", 1)[1], [p.split(": ", 1)[0]])
             for p in problems + encode_problems]
    if cfg.overlong_samples == "fail":
        found += [Finding(ERROR, "too_long", f"{s.original_length} tokens, longer than max_seq_length "
                          f"{cfg.max_seq_length}", [s.source]) for s in samples if s.truncated]
        samples = [s for s in samples if not s.truncated]
    found += _sample_warnings(samples) + _raw_warnings(raw)
    lengths = [s.original_length for s in samples]
    found.append(Finding(INFO, "counts", f"{len(raw)} samples read, {len(samples)} usable, "
                         f"{sum(lengths)} tokens, {sum(s.num_targets for s in samples)} of them trained"))
    if not encoder.has_template:
        found.append(Finding(INFO, "no_chat_template", "the tokenizer has no chat template: chats are laid "
                             "out as 'role: content' lines"))
    return {"findings": found, "histogram": histogram(lengths), "max_seq_length": cfg.max_seq_length}


def format_report(report: dict) -> str:
    lines = []
    for f in report["findings"]:
        files = f" [{', '.join(f.files[:5])}{' ...' if len(f.files) > 5 else ''}]" if f.files else ""
        lines.append(f"{f.severity:7}  {f.message}{files}")
    lines.append(f"token lengths (max_seq_length {report['max_seq_length']}):")
    peak = max((c for _, _, c in report["histogram"]), default=1) or 1
    for low, high, count in report["histogram"]:
        lines.append(f"  {low:>6}-{high:<6} {count:>6}  {'#' * round(40 * count / peak)}")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> Path:
    from ...storage.atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    data = {**report, "findings": [dataclasses.asdict(f) for f in report["findings"]]}
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


__all__ = ["LMDataError", "check_before_training", "errors", "format_report", "full_check", "write_report"]
