"""`lora-trainer ui`: the Train LoRA tab as a standalone web app (no WebUI needed).

Listens on 127.0.0.1 unless --listen is given. Every request passes `http_guard.RequestGuard`
first (no other web site, no DNS rebinding, no files outside gradio's own copies; see
docs/security.md). Whoever reaches the page can start training and make the server read and write
files, so --listen (all interfaces) needs a login: --auth user:password or --auth-file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

LISTEN_WARNING = ("WARNING: --listen: the UI listens on all network interfaces (0.0.0.0). Everyone who "
                  "logs in on port {port} can start training runs and make this machine read and write "
                  "files. Use it only on a network you trust.")
AUTH_REQUIRED = ("error: --listen makes the UI reachable from other machines, and whoever reaches it can "
                 "read and write this machine's files: give a login with --auth user:password or "
                 "--auth-file FILE (one user:password per line)")


class UsageError(ValueError):
    """A bad combination of `lora-trainer ui` options; the message says what to pass."""


def register(subparsers) -> None:
    """Adds `ui` to the lora-trainer CLI (cheap: nothing is imported until the command runs)."""
    p = subparsers.add_parser("ui", help="Open the Train LoRA web UI in the browser (standalone).",
                              description="Serve the Train LoRA tab as a standalone web app. Open the "
                                          "printed URL in a browser. Ctrl+C stops the server (a "
                                          "running training is stopped cleanly with a checkpoint).")
    p.add_argument("--port", type=int, default=None,
                   help="Port to listen on (default: the first free port from 7860)")
    p.add_argument("--listen", action="store_true",
                   help="Listen on 0.0.0.0 (reachable from other machines) instead of 127.0.0.1; "
                        "needs --auth or --auth-file")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="Login for the page (several: comma-separated). Required with --listen")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="A file of logins, one user:password per line (instead of --auth)")
    p.add_argument("--config", default=None,
                   help="A YAML config (preset) to fill the form with at start")
    p.set_defaults(func=cmd_ui)


def _initial_values(config_path):
    if not config_path:
        return None
    from ..app.run_config import load_run_config
    from ..config import config_to_dict

    return config_to_dict(load_run_config(config_path))


def create_app(defaults=None, base_dir=None):
    """The standalone Blocks, queue enabled (the live view needs it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import compat
    from .tab import build_tab

    blocks = build_tab(mode="standalone", defaults=defaults, base_dir=base_dir)
    compat.enable_queue(blocks)
    return blocks


def parse_logins(text: str, source: str = "--auth") -> list[tuple[str, str]]:
    """[(user, password)] from "u:p" entries separated by commas or new lines."""
    logins = []
    for number, entry in enumerate(text.replace(",", "\n").splitlines(), start=1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            # never repeat the entry: it may be a password
            raise UsageError(f"error: {source}: entry {number} is not user:password")
        logins.append((user, password))
    if not logins:
        raise UsageError(f"error: {source} has no user:password entry")
    return logins


def logins_from_args(auth: Optional[str], auth_file: Optional[str]) -> Optional[list]:
    if auth and auth_file:
        raise UsageError("error: give --auth or --auth-file, not both")
    if auth:
        return parse_logins(auth)
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"error: cannot read --auth-file {auth_file}: "
                             f"{getattr(error, 'strerror', None) or type(error).__name__}") from None
        return parse_logins(text, f"--auth-file {auth_file}")
    return None


def launch(port=None, listen=False, defaults=None, base_dir=None, auth=None):
    """Serve the app (in a thread) and return the `serve.RunningApp`. Refuses --listen without a
    login (UsageError)."""
    from .serve import serve

    if listen and not auth:
        raise UsageError(AUTH_REQUIRED)
    host = "0.0.0.0" if listen else "127.0.0.1"
    if listen:
        print(LISTEN_WARNING.format(port=port or "7860+"), file=sys.stderr, flush=True)
    blocks = create_app(defaults, base_dir)
    running = serve(blocks, host, port, listen=listen, auth=auth, css=getattr(blocks, "lora_trainer_css", None))
    print(f"Running on local URL:  {running.url}", flush=True)
    return running


def cmd_ui(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print("error: the UI needs gradio: pip install 'lora_trainer[ui]' (or gradio==3.41.2)",
              file=sys.stderr)
        return 2
    try:
        auth = logins_from_args(args.auth, args.auth_file)
        if args.listen and not auth:
            raise UsageError(AUTH_REQUIRED)
    except UsageError as error:
        print(str(error), file=sys.stderr)
        return 2
    defaults = _initial_values(args.config)
    try:
        running = launch(args.port, args.listen, defaults, base_dir=Path.cwd(), auth=auth)
    except OSError as error:      # e.g. the port is taken: say so, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        _wait_forever()
    except KeyboardInterrupt:
        _shutdown(running)
    return 0


def _wait_forever():
    import time

    while True:
        time.sleep(3600)


def _shutdown(running) -> None:
    from .worker import default_worker

    worker = default_worker()
    if worker.active:
        print("Stopping the training run (finishing the step, saving a checkpoint)...", file=sys.stderr,
              flush=True)
        worker.stop()
        worker.join(timeout=600)
    running.close()
