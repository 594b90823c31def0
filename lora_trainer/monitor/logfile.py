"""`<run_dir>/logs/train.log`: timestamped, appended across resumes, readable while training."""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@contextlib.contextmanager
def attach_run_log(run_dir: Path, max_bytes: int = 20 << 20, backups: int = 3):
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(logs / "train.log", maxBytes=max_bytes,
                                                   backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("lora_trainer")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield logs / "train.log"
    finally:
        logger.removeHandler(handler)
        handler.close()
