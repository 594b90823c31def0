"""`lora-trainer ui`: the Train LoRA tab as a standalone web app (no WebUI needed).

Listens on 127.0.0.1 unless --listen is given. The page has no login: with --listen anyone who can
reach the port can start training and make the server read and write files, hence the warning.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

LISTEN_WARNING = ("WARNING: --listen: the UI listens on all network interfaces (0.0.0.0) without any "
                  "login. Anyone who can reach port {port} can start training runs and make this "
                  "machine read and write files. Use it only on a network you trust.")


def register(subparsers) -> None:
    """Adds `ui` to the lora-trainer CLI (cheap: nothing is imported until the command runs)."""
    p = subparsers.add_parser("ui", help="Open the Train LoRA web UI in the browser (standalone).",
                              description="Serve the Train LoRA tab as a standalone web app. Open the "
                                          "printed URL in a browser. Ctrl+C stops the server (a "
                                          "running training is stopped cleanly with a checkpoint).")
    p.add_argument("--port", type=int, default=None,
                   help="Port to listen on (default: the first free port from 7860)")
    p.add_argument("--listen", action="store_true",
                   help="Listen on 0.0.0.0 (reachable from other machines) instead of 127.0.0.1")
    p.add_argument("--config", default=None,
                   help="A YAML config (preset) to fill the form with at start")
    p.set_defaults(func=cmd_ui)


def _initial_values(config_path):
    if not config_path:
        return None
    from ..config import config_to_dict, load_config

    return config_to_dict(load_config(config_path))


def create_app(defaults=None, base_dir=None):
    """The standalone Blocks, queue enabled (the live view needs it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import compat
    from .tab import build_tab

    blocks = build_tab(mode="standalone", defaults=defaults, base_dir=base_dir)
    compat.enable_queue(blocks)
    return blocks


def launch(port=None, listen=False, defaults=None, base_dir=None, block=True):
    from . import compat

    host = "0.0.0.0" if listen else "127.0.0.1"
    if listen:
        print(LISTEN_WARNING.format(port=port or "7860+"), file=sys.stderr, flush=True)
    blocks = create_app(defaults, base_dir)
    compat.launch(blocks, host, port, css=getattr(blocks, "lora_trainer_css", None), block=block)
    return blocks


def cmd_ui(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("error: the UI needs gradio: pip install 'lora_trainer[ui]' (or gradio==3.41.2)",
              file=sys.stderr)
        return 2
    defaults = _initial_values(args.config)
    blocks = launch(args.port, args.listen, defaults, base_dir=Path.cwd(), block=False)
    try:
        _wait_forever()
    except KeyboardInterrupt:
        _shutdown(blocks)
    return 0


def _wait_forever():
    import time

    while True:
        time.sleep(3600)


def _shutdown(blocks) -> None:
    from .worker import default_worker

    worker = default_worker()
    if worker.active:
        print("Stopping the training run (finishing the step, saving a checkpoint)...", file=sys.stderr,
              flush=True)
        worker.stop()
        worker.join(timeout=600)
    try:
        blocks.close()
    except Exception:  # noqa: BLE001 - shutting down anyway
        pass
