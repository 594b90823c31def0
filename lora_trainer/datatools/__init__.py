"""Dataset tools: the data check (`lora-trainer check-data`, and the fast part that training runs
before it starts) and CLIP auto-labeling (`lora-trainer label`).

Public API:
  quick_check(index, cfg) -> [Finding]          fast checks on a discovered DatasetIndex
  check_before_training(index, cfg, log)        quick_check + raise DataError on errors
  check_dataset(folder, CheckOptions(...))      every check -> CheckResult (findings, per-image rows)
  write_reports(result, out_dir) / format_table(result)
  label_folder(folder, tagger, LabelOptions(...)) with ZeroShotTagger(load_clip(resolve_model(...)))

Heavy modules (torch, open_clip) are imported only inside the labeling functions.
"""
from .checks import CheckOptions, check_before_training, quick_check
from .findings import ERROR, INFO, WARNING, Finding

__all__ = ["CheckOptions", "ERROR", "Finding", "INFO", "WARNING", "check_before_training", "quick_check"]
