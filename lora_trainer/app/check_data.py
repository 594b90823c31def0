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
    cfg = _training_config(args.target)
    if cfg is not None and cfg.task_type == "causal_lm":
        return _check_lm_data(cfg, args)
    return check_image_dataset(args, cfg)


def _training_config(target: str):
    """The config when `target` is a training config (an SD one at its model's native resolution
    when it names none), else None (a dataset folder)."""
    path = Path(target)
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return None
    from .run_config import load_run_config

    return load_run_config(path)


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
