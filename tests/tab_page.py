"""The Train LoRA tab in a browser (Playwright + Debian's /usr/bin/chromium): what the standalone
page's tests (tests/ui/test_browser.py) and the real-WebUI tests (tests/webui/test_real_webui_browser.py)
share. Import it after `pytest.importorskip("playwright.sync_api")`; a module that needs Chromium
calls `skip_without_chromium()` at import time."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORA_TRAINER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
TRAIN_TIMEOUT_MS = 180_000


def skip_without_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def screenshots_folder(tmp_path_factory, default_name: str) -> Path:
    """$LORA_TRAINER_UI_SCREENSHOTS, else a pytest tmp folder."""
    folder = os.environ.get("LORA_TRAINER_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp(default_name)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- the form ---------------------------------------------------------------------------------------

def box(page, field: str):
    """The input of a form field (gradio renders text as <input> or <textarea>)."""
    return page.locator(f"#lora_trainer_{field}").first.locator("textarea, input").first


def fill(page, **values) -> None:
    for field, value in values.items():
        target = box(page, field)
        target.fill(str(value))
        target.dispatch_event("blur")


def click(page, button: str) -> None:
    page.locator(f"#lora_trainer_btn_{button}").first.click()


def message(page):
    return page.locator("#lora_trainer_message").last


def progress(page):
    return page.locator("#lora_trainer_progress .lora-trainer-progress").first


def wait_status(page, run: str, *statuses: str, timeout: int = TRAIN_TIMEOUT_MS) -> dict:
    """Wait until the live view shows run `run` in one of `statuses`; its status, step, total, text."""
    from playwright.sync_api import expect

    expect(progress(page)).to_have_attribute("data-run", run, timeout=timeout)
    wanted = "|".join(statuses)
    expect(progress(page)).to_have_attribute("data-status", re.compile(f"^({wanted})$"), timeout=timeout)
    element = progress(page)
    return {"status": element.get_attribute("data-status"), "step": int(element.get_attribute("data-step")),
            "total": int(element.get_attribute("data-total")), "text": element.inner_text()}
