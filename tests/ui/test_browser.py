"""The standalone Train LoRA page in a real browser (Playwright + Debian's /usr/bin/chromium).

One `lora-trainer ui` subprocess and one page for the whole module; the tests run in file order:
a bad field, a full training run with previews and the loss curve, stop + resume from the runs
list, presets, the data check. Screenshots go to $LORA_TRAINER_UI_SCREENSHOTS or a tmp folder.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

sys.path.insert(0, str(Path(__file__).parents[1]))
from tab_page import (TRAIN_TIMEOUT_MS, box, click, fill, launch, message, progress,  # noqa: E402
                      screenshots_folder, skip_without_chromium, wait_status)

skip_without_chromium()
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshots_folder(tmp_path_factory, "ui_screenshots")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`python -m lora_trainer ui --port P` in a fresh folder (runs go to <folder>/runs)."""
    work = tmp_path_factory.mktemp("ui_app")
    port = _free_port()
    log_path = work / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", "ui", "--port", str(port)],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the UI did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    yield {"url": url, "work": work, "log": log_path}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        try:
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app["url"].rstrip("/"))
        except Exception:  # noqa: BLE001 - the copy test then checks the button only
            pass
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(app["url"])
        page.wait_for_selector("#lora_trainer_btn_start")
        yield page
        browser.close()


# ---- helpers ------------------------------------------------------------------------------------

def base_form(page, tiny_sd1, shapes_dataset, app, name: str, **extra) -> None:
    values = dict(train_data_dir=shapes_dataset, base_model=tiny_sd1["single_file"], resolution=64,
                  epochs=1, max_train_steps="", batch_size=2, lora_rank=4, learning_rate=0.001, output_name=name,
                  output_dir=app["work"] / "loras", save_steps=0)
    values.update(extra)
    fill(page, **values)


# ---- tests --------------------------------------------------------------------------------------

def test_bad_fields_are_listed_next_to_the_form(page, shots):
    fill(page, resolution=10, train_data_dir="", learning_rate=5)
    click(page, "start")
    problems = page.locator("#lora_trainer_problems")
    sync_api.expect(problems).to_be_visible()
    text = problems.inner_text()
    assert "Resolution (resolution)" in text and "out of range" in text
    assert "Dataset folder (train_data_dir)" in text and "missing" in text
    assert "Learning rate (learning_rate)" in text
    assert "Base model" in text          # still empty: every problem at once
    assert "Traceback" not in text
    page.screenshot(path=str(shots / "01_problems.png"))


def test_train_to_the_end_with_previews_and_loss_curve(page, shots, tiny_sd1, shapes_dataset, app):
    # previews at the start and at the end only (preview_every_n_steps 0): enough to see them
    base_form(page, tiny_sd1, shapes_dataset, app, "ui_full", max_train_steps=4, preview_every_n_steps=0,
              preview_steps=2, preview_prompts="lt_demo, a red circle")
    click(page, "start")
    sync_api.expect(message(page)).to_contain_text("Training started")
    state = wait_status(page, "ui_full", "finished", "error", "stopped")
    assert state["status"] == "finished", message(page).inner_text()
    assert state["step"] == state["total"] == 4
    sync_api.expect(progress(page)).to_contain_text("step 4/4")
    # the loss curve (vega draws a canvas or svg) and the preview gallery
    page.wait_for_selector("#lora_trainer_loss_plot canvas, #lora_trainer_loss_plot svg.marks")
    page.wait_for_selector("#lora_trainer_previews img")
    assert page.locator("#lora_trainer_previews img").count() >= 1
    # the finished LoRA and its prompt tag
    sync_api.expect(box(page, "result_tag")).to_have_value("<lora:ui_full:0.7>")
    path = box(page, "result_path").input_value()
    assert path.endswith("ui_full.safetensors") and Path(path).is_file()
    log_text = page.locator("#lora_trainer_log textarea").first.input_value()
    assert "Finished 4 steps" in log_text
    page.locator("#lora_trainer_btn_copy_tag").first.click()
    sync_api.expect(page.locator("#lora_trainer_btn_copy_tag").first).to_have_text("Copied!")
    assert page.evaluate("window.loraTrainerLastCopied") == "<lora:ui_full:0.7>"
    page.screenshot(path=str(shots / "02_finished.png"))
    page.screenshot(path=str(shots / "02_finished_full.png"), full_page=True)


def test_stop_then_resume_from_the_runs_list(page, shots, tiny_sd1, shapes_dataset, app):
    base_form(page, tiny_sd1, shapes_dataset, app, "ui_stop", epochs=4, preview_every_n_steps=0,
              preview_prompts="")
    click(page, "start")
    sync_api.expect(message(page)).to_contain_text("Training started")
    click(page, "start")   # a second run while one is active is refused
    sync_api.expect(message(page)).to_contain_text("already active")
    click(page, "stop")     # while loading or at the first steps: stops cleanly with a checkpoint
    stopped = wait_status(page, "ui_stop", "stopped", "finished", "error")
    assert stopped["status"] == "stopped", message(page).inner_text()
    assert 0 < stopped["step"] < stopped["total"] == 24
    sync_api.expect(message(page)).to_contain_text("Stopped at step")
    # the runs list shows the run with its checkpoint; pick it and resume
    table = page.locator("#lora_trainer_runs_table").first
    sync_api.expect(table).to_contain_text("ui_stop")
    rows = table.inner_text()
    assert re.search(rf"ui_stop\s+{stopped['step']}\s", rows), rows
    choice = page.locator("#lora_trainer_runs_choice input").first
    choice.click()
    page.locator("#lora_trainer_runs_choice li", has_text="ui_stop").first.click()
    sync_api.expect(choice).to_have_value(re.compile(r"ui_stop$"))
    page.keyboard.press("Escape")
    page.screenshot(path=str(shots / "03_stopped.png"))
    click(page, "resume")
    sync_api.expect(message(page)).to_contain_text("Resuming")
    sync_api.expect(progress(page)).not_to_have_attribute("data-status", "stopped", timeout=TRAIN_TIMEOUT_MS)
    done = wait_status(page, "ui_stop", "finished", "error", "stopped")
    assert done["status"] == "finished", message(page).inner_text()
    assert done["step"] == done["total"] == 24
    log_text = page.locator("#lora_trainer_log textarea").first.input_value()
    assert re.search(r"[Rr]esum", log_text), log_text[-2000:]
    assert (app["work"] / "loras" / "ui_stop.safetensors").is_file()
    page.screenshot(path=str(shots / "04_resumed.png"))


def test_save_and_load_a_preset(page, app, tiny_sd1, shapes_dataset):
    preset = app["work"] / "presets" / "mine.yaml"
    base_form(page, tiny_sd1, shapes_dataset, app, "from_preset", lora_rank=16, max_train_steps="")
    fill(page, preset_path="mine")       # a name: presets live in <cwd>/presets
    click(page, "save_preset")
    sync_api.expect(message(page)).to_contain_text("Saved preset")
    saved = yaml.safe_load(preset.read_text())
    assert saved["output_name"] == "from_preset" and saved["lora_rank"] == 16
    fill(page, output_name="changed", lora_rank=2)
    click(page, "load_preset")
    sync_api.expect(message(page)).to_contain_text("Loaded preset")
    sync_api.expect(box(page, "output_name")).to_have_value("from_preset")
    sync_api.expect(box(page, "lora_rank")).to_have_value("16")
    # a preset with a bad value loads what it can and lists the problem
    saved["resolution"] = 7
    preset.write_text(yaml.safe_dump(saved))
    click(page, "load_preset")
    sync_api.expect(page.locator("#lora_trainer_problems")).to_contain_text("Resolution (resolution)")
    sync_api.expect(box(page, "resolution")).to_have_value("7")


def test_check_data_button(page, shapes_dataset, shots):
    import importlib.util

    fill(page, train_data_dir=shapes_dataset, resolution=64)
    click(page, "check_data")
    installed = importlib.util.find_spec("lora_trainer.datatools") is not None
    expected = "Data check of" if installed else "Data tools not installed"
    sync_api.expect(message(page)).to_contain_text(expected, timeout=60_000)
    page.screenshot(path=str(shots / "05_check_data.png"))
