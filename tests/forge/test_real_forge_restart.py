"""kill -9 of a real Forge mid-run, a restart over the same data folder, and the same request with
`resume` finishes the run (skipped without LORA_TRAINER_FORGE_DIR, see forge_harness). Two Forge
processes, one after the other; none of test_real_forge.py's is up meanwhile."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from forge_harness import FORGE_DIR, SKIP_REASON, forge_data, start_forge, stop_forge  # noqa: F401 (fixture)
from test_real_forge import config, tab_api

pytestmark = pytest.mark.skipif(not FORGE_DIR, reason=SKIP_REASON)


def test_kill_forge_mid_run_then_resume(forge_data, tmp_path):
    name = "forge_crash"
    cfg = config(forge_data, name, max_train_steps=8, save_steps=1, preview_prompts=[], resume=True)
    log = forge_data["extension"] / "runs" / name / "logs" / "train.log"
    server = start_forge(forge_data, tmp_path / "first.log")
    try:
        threading.Thread(target=lambda: _ignore_errors(tab_api, server["url"], cfg), daemon=True).start()
        deadline = time.time() + 600
        while not (log.exists() and "event checkpoint: step 2 " in log.read_text()):
            assert time.time() < deadline and server["process"].poll() is None
            time.sleep(0.5)
    finally:
        stop_forge(server, kill=True)   # SIGKILL: no clean stop, no final save

    server = start_forge(forge_data, tmp_path / "restarted.log")
    try:
        result = json.loads(tab_api(server["url"], cfg)[0])
        assert result["status"] == "finished" and result["step"] == 8, result
        assert "run resumed at step" in log.read_text()
        assert Path(result["lora_path"]).exists()
    finally:
        stop_forge(server)


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except Exception:   # the server is killed under this request on purpose
        pass
