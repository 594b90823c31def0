"""`lora-trainer` command line. Subcommands stay thin: each parses arguments and calls the package."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .app.run_config import load_run_config
from .config import ConfigError, add_config_arguments, overrides_from_args
from .diffusion.families import FAMILIES


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Train a LoRA from a YAML config (resumes automatically).",
                       description="Train a LoRA. Every config key can also be given as a flag; flags "
                                   "override the YAML. Rerunning the same command resumes the run.")
    p.add_argument("--config", required=True, help="YAML config file (see docs/config-reference.md)")
    p.add_argument("--force-resume", action="store_true",
                   help="Resume even though the config or dataset changed in a way that can continue "
                        "(e.g. more epochs, a new learning rate).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="Build a tiny model and dataset offline and train on them.")
    p.add_argument("--workdir", default="demo", help="Folder for the demo model, data, config and output "
                                                      "(default ./demo)")
    p.add_argument("--family", default="sd1", choices=tuple(FAMILIES),
                   help="Model family of the tiny model (default sd1)")
    p.add_argument("--task", default="sd", choices=("sd", "causal_lm"),
                   help="sd: a tiny Stable Diffusion model and images (default); causal_lm: a tiny "
                        "LLaMA, its tokenizer and chats, trained into a PEFT adapter")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.set_defaults(func=cmd_demo)


def _add_checkpoints(sub) -> None:
    p = sub.add_parser("checkpoints", help="List the checkpoints of a run folder.")
    p.add_argument("run_dir", help="The run folder (run_dir in the config; default runs/<output_name>)")
    p.set_defaults(func=cmd_checkpoints)


# Subcommands that live with their feature: each module has `register(subparsers)` which adds its
# parser and sets `func`. Imported lazily per module so `lora-trainer train` never loads the UI.
FEATURE_COMMANDS = [
    "lora_trainer.app.doctor",
    "lora_trainer.app.check_data",
    "lora_trainer.datatools.commands",
    "lora_trainer.ui.app",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-trainer", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="Debug logging on the console.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_demo(sub)
    _add_checkpoints(sub)
    for module in FEATURE_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def _setup_console_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    handler.addFilter(lambda record: verbose or not getattr(record, "file_only", False))
    logger = logging.getLogger("lora_trainer")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def run_with_signals(cfg, quiet: bool, force_resume: bool = False):
    from .monitor.console import ConsoleProgress
    from .training.control import TrainingControl, install_signal_handlers
    from .app.session import train_from_config

    control = TrainingControl()
    restore = install_signal_handlers(control)
    try:
        return train_from_config(cfg, control, [ConsoleProgress(quiet=quiet)], force_resume)
    finally:
        restore()


def cmd_train(args) -> int:
    cfg = load_run_config(args.config, overrides_from_args(args))
    result = run_with_signals(cfg, args.quiet, args.force_resume)
    if result.status == "stopped":
        print(f"Resume with: lora-trainer train --config {args.config}")
        return 130
    return 0


def cmd_demo(args) -> int:
    from .tools.demo import prepare_demo, prepare_lm_demo

    if args.task == "causal_lm":
        config_path = prepare_lm_demo(Path(args.workdir))
    else:
        config_path = prepare_demo(Path(args.workdir), family=args.family)
    print(f"Demo model, data and config written to {config_path.parent}")
    cfg = load_run_config(config_path)
    result = run_with_signals(cfg, args.quiet)
    print(f"Rerun with: lora-trainer train --config {config_path}")
    return 0 if result.status in ("finished", "already_finished") else 130


def cmd_checkpoints(args) -> int:
    from .storage.checkpoints import CheckpointStore

    infos = CheckpointStore(Path(args.run_dir)).list()
    if not infos:
        print(f"No checkpoints in {args.run_dir}")
        return 1
    print(f"{'step':>8}  {'loss':>9}  {'saved':19}  {'size':>9}  status")
    for i in infos:
        loss = f"{i.loss:.5f}" if i.loss is not None else "-"
        import time
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created)) if i.created else "-"
        status = "valid" if i.valid else f"INVALID: {i.problem}"
        print(f"{i.step:>8}  {loss:>9}  {when:19}  {i.size_bytes / 1024:>7.0f}KB  {status}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_console_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted without saving (second Ctrl+C). The last checkpoint is intact.", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors carry their own message; the stack is in train.log
        if args.verbose:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
