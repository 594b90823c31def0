"""`lora-trainer check-data`: the task of a training config picks its checker (image datasets in
datatools/, causal-LM datasets in tasks/causal_lm). The dispatch lives in the composition root so
that datatools/ never imports tasks/ (tasks/ builds on datatools/)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..datatools.commands import check_image_dataset, register_check


def register(subparsers) -> None:
    register_check(subparsers, cmd_check_data)


def cmd_check_data(args) -> int:
    lm_config = _causal_lm_config(args.target)
    if lm_config is not None:
        return _check_lm_data(lm_config, args)
    return check_image_dataset(args)


def _causal_lm_config(target: str):
    """The config when `target` is a causal_lm training config, else None."""
    path = Path(target)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return None
    from ..config import load_config

    cfg = load_config(path)
    return cfg if cfg.task_type == "causal_lm" else None


def _check_lm_data(cfg, args) -> int:
    """Token lengths, empty/duplicate samples, bad lines and template errors of a causal_lm dataset
    (the base model's tokenizer is loaded; the model is not)."""
    from ..tasks.causal_lm.check import format_report, full_check, write_report
    from ..tasks.causal_lm.model import ModelFolderError
    from ..tasks.causal_lm.records import LMDataError

    try:
        report = full_check(cfg)
    except (LMDataError, ModelFolderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"Report: {write_report(report, args.out)}")
    has_errors = any(f.severity == "error" for f in report["findings"])
    return 1 if args.strict and has_errors else 0
