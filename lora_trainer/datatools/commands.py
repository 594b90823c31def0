"""`lora-trainer check-data` and `lora-trainer label`. Parsing only; imports stay lazy so that
building the CLI parser (done for every command, `train` included) loads nothing heavy."""
from __future__ import annotations

import sys
from pathlib import Path

CHECK_EPILOG = """\
severity: error   = unreadable/corrupt images; images upscaled 4x or more to the resolution.
                    Training refuses to start on these (unless bad_image_policy: skip for the
                    former, check_data: false for the latter).
          warning = small images, extreme aspect ratios, exact and near duplicates, likely blurry
                    images, missing/empty captions, captions over 75 tokens, unsupported formats.
          info    = epoch size, images per repeat folder, top tags, aspect buckets, caption lengths.
exit code: 0 when the report was written; with --strict, 1 if there are errors (warnings never
           fail: blur and near-duplicate detection are heuristics); 2 if the dataset or config
           cannot be read at all.
"""


def register(subparsers) -> None:
    """`label` only: `check-data` is registered by app.check_data, which picks the task's checker
    (datatools/ knows image datasets, not tasks)."""
    _register_label(subparsers)


# ---- check-data ----------------------------------------------------------------------------------

def register_check(subparsers, func) -> None:
    import argparse

    p = subparsers.add_parser(
        "check-data", help="Check a dataset (corrupt, tiny, duplicate, blurry images; captions) and "
        "write a report.", description="Check a training dataset and write report.json and "
        "report.html (with thumbnails). Nothing is loaded but the CLIP tokenizer.",
        epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="A dataset folder, or a training config .yaml (its train_data_dir, "
                                  "metadata_path, caption_extension, repeats and resolution are used)")
    p.add_argument("--resolution", type=int, metavar="N", help="Training resolution (default: the config's, or 512)")
    p.add_argument("--strict", action="store_true", help="Exit with 1 when there are errors.")
    p.add_argument("--blur-threshold", type=float, default=None, metavar="X",
                   help="Sharpness (variance of the Laplacian, measured with the image scaled to the "
                        "training resolution) below which an image is flagged as blurry (default 30)")
    p.add_argument("--max-aspect", type=float, default=None, metavar="X",
                   help="Flag images whose long side exceeds this many times the short side (default 4)")
    p.add_argument("--near-duplicate-distance", type=int, default=None, metavar="N",
                   help="Perceptual-hash bits (of 64) two images may differ in and still count as near "
                        "duplicates (default 6; 0 = only visually identical)")
    p.add_argument("--out", default="data-report", help="Folder for report.json and report.html "
                                                         "(default ./data-report)")
    p.set_defaults(func=func)


def check_image_dataset(args, cfg=None) -> int:
    """check-data for an image dataset: the folder `args.target`, or the dataset of `cfg` (the
    training config `args.target` names, loaded by the caller: app.check_data)."""
    from ..data.discovery import DataError
    from .checks import CheckOptions
    from .full_check import check_dataset
    from .report import format_table, write_reports

    try:
        source = _check_source(args.target, cfg)
        config_resolution = source.pop("resolution", 512)
        options = CheckOptions(resolution=args.resolution or config_resolution)
        _apply_overrides(options, args)
        result = check_dataset(options=options, **source)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_reports(result, args.out)
    print(format_table(result))
    print(f"Report: {paths['json']}  {paths['html']}")
    has_errors = any(f.severity == "error" for f in result.findings)
    return 1 if args.strict and has_errors else 0


def _check_source(target: str, cfg) -> dict:
    """check_dataset arguments for a config's dataset, or for the folder `target`."""
    if cfg is not None:
        return dict(train_data_dir=cfg.train_data_dir, metadata_path=cfg.metadata_path,
                    caption_extension=cfg.caption_extension, default_repeats=cfg.repeats,
                    resolution=cfg.resolution)
    return dict(train_data_dir=target)


def _apply_overrides(options, args) -> None:
    if args.blur_threshold is not None:
        options.blur_threshold = args.blur_threshold
    if args.max_aspect is not None:
        options.max_aspect_ratio = args.max_aspect
    if args.near_duplicate_distance is not None:
        options.near_duplicate_distance = args.near_duplicate_distance


# ---- label ---------------------------------------------------------------------------------------

def _register_label(subparsers) -> None:
    p = subparsers.add_parser(
        "label", help="Caption a dataset by CLIP zero-shot tagging (metadata.csv and/or .txt).",
        description="Tag every image without a caption against tag vocabularies with a local "
                    "open_clip model and write 'trigger, tag, tag, ...' captions. Nothing is "
                    "downloaded; weights must be .safetensors.")
    p.add_argument("folder", help="The dataset folder")
    p.add_argument("--model-path", help="open_clip folder (open_clip_config.json + *.safetensors) or a "
                                        ".safetensors weights file (then also --model)")
    p.add_argument("--model", help="open_clip architecture (e.g. ViT-B-32, or a model-config .json), or "
                                   "a model to find in --cache-dir")
    p.add_argument("--cache-dir", help="Hugging Face cache or folder with <MODEL>.safetensors "
                                       "(default: the user's Hugging Face cache)")
    p.add_argument("--trigger", help="Trigger word put first in every new caption")
    p.add_argument("--top-k", type=int, default=2, help="Tags per vocabulary category (default 2)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="Minimum probability of a tag within its category (default 0.1)")
    p.add_argument("--batch-size", type=int, default=16, help="Images per batch (default 16)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--write", choices=("csv", "txt", "both"), default="csv",
                   help="metadata.csv (default), .txt sidecars, or both")
    p.add_argument("--overwrite", action="store_true", help="Replace existing captions too")
    p.add_argument("--vocab", nargs="+", action="extend", default=[], metavar="FILE",
                   help="Extra tag lists (one tag per line); the file name is the category")
    p.add_argument("--quiet", action="store_true", help="No progress bar")
    p.set_defaults(func=cmd_label)


def cmd_label(args) -> int:
    from ..data.discovery import DataError
    from .clip_model import ModelNotFound
    from .label import LabelOptions, auto_label

    if not Path(args.folder).is_dir():
        print(f"error: '{args.folder}' is not a folder", file=sys.stderr)
        return 2
    options = LabelOptions(trigger=args.trigger, batch_size=args.batch_size, write=args.write,
                           overwrite=args.overwrite, progress=not args.quiet)
    try:
        result = auto_label(args.folder, options, args.model_path, args.model, args.cache_dir, args.device,
                            args.vocab, args.top_k, args.threshold)
    except (ModelNotFound, ValueError, OSError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_label_result(result)
    return 0


def _print_label_result(result) -> None:
    print(f"Labeled {len(result.labeled)} image(s); kept {len(result.kept)} existing caption(s).")
    if result.kept:
        print("Kept (use --overwrite to replace): " + ", ".join(result.kept[:10])
              + (f" (+{len(result.kept) - 10} more)" if len(result.kept) > 10 else ""))
    for line in result.unreadable:
        print(f"Skipped unreadable image {line}")
    for note in result.notes:
        print(f"note: {note}")
    for path in result.written[:3]:
        print(f"Wrote {path}")
    if len(result.written) > 3:
        print(f"... and {len(result.written) - 3} more files")
