"""The Train LoRA tab inside the real AUTOMATIC1111 WebUI, driven with Playwright + Chromium as a
user would (skipped without LORA_TRAINER_WEBUI_DIR, or without Playwright / Chromium).

One WebUI server of this module's own (it is killed and restarted), one page; the tests run in
file order and build on each other:

1. the top-level "Train LoRA" tab, its form and its CSS inside the WebUI;
2. Start trains on the loaded model (no reload, bit-identical afterwards), the tab's progress
   shows steps, the preview gallery fills and the final preview is what txt2img gives;
3. the new LoRA is on txt2img's Lora cards with its thumbnail, without pressing Refresh;
   a run without preview prompts still gets a card thumbnail (a final render);
4. stacking with another LoRA, in txt2img and in a preview prompt;
5. SIGKILL of the server mid-run, a restart over the same --data-dir, Resume from the Runs list.

Screenshots go to $LORA_TRAINER_UI_SCREENSHOTS or a tmp folder.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import webui_harness
from webui_harness import SKIP_REASON, WEBUI_DIR, pixels

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

sync_api = pytest.importorskip("playwright.sync_api")
sys.path.insert(0, str(Path(__file__).parents[1]))
from tab_page import (TRAIN_TIMEOUT_MS, box, fill, launch, message, progress,  # noqa: E402
                      screenshots_folder, skip_without_chromium, wait_status)

skip_without_chromium()

PROMPT = "lt_demo, a red circle"
# what the previews and the API txt2img below share (the tab's preview_* fields)
PREVIEW = dict(preview_steps=4, preview_width=64, preview_height=64, preview_seed=1,
               preview_cfg_scale=7, preview_negative_prompt="")


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshots_folder(tmp_path_factory, "webui_screenshots")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """This module's WebUI over its own --data-dir; `site["server"]` is replaced on a restart."""
    from conftest import prepare_webui_data, start_webui, stop_webui

    data = tmp_path_factory.mktemp("webui-browser-data")
    prepared = prepare_webui_data(data)
    site = {**prepared, "logs": data.parent / f"{data.name}-logs"}
    site["logs"].mkdir()
    site["server"] = start_webui(prepared["root"], prepared["python"], data, site["logs"] / "webui-1.log",
                                 prepared["env"])
    try:
        yield site
    finally:
        if site.get("server"):
            stop_webui(site["server"])


@pytest.fixture(scope="module")
def page(site):
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(viewport={"width": 1500, "height": 1100})
        page = context.new_page()
        page.set_default_timeout(60_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(f"{error}\n{error.stack}"))
        page.js_errors = errors
        open_webui(page, site)
        yield page
        browser.close()


# ---- helpers --------------------------------------------------------------------------------------

def url(site) -> str:
    return site["server"]["url"]


def open_webui(page, site) -> None:
    page.goto(url(site))
    page.wait_for_selector("#tabs > .tab-nav button", timeout=120_000)


def top_tab(page, title: str):
    """A top-level tab's header button (gradio 3.41 gives them no id; the WebUI's #tabs holds them)."""
    return page.locator("#tabs > .tab-nav > button", has_text=re.compile(rf"^\s*{re.escape(title)}\s*$"))


def open_train_tab(page) -> None:
    top_tab(page, "Train LoRA").click()
    sync_api.expect(page.locator("#tab_lora_trainer")).to_be_visible()
    sync_api.expect(page.locator("#lora_trainer_btn_start")).to_be_visible()


def train_form(page, site, name: str, **extra) -> None:
    values = dict(train_data_dir=site["dataset"], output_name=name, resolution=64, lora_rank=4,
                  batch_size=2, learning_rate=0.02, epochs=100, max_train_steps=8, save_steps=0,
                  preview_prompts="", preview_every_n_steps=0, **PREVIEW)
    values.update(extra)
    fill(page, **values)


def model_state(site) -> dict:
    return webui_harness.model_state(url(site))


def txt2img(site, prompt: str) -> np.ndarray:
    return webui_harness.txt2img(url(site), prompt, steps=PREVIEW["preview_steps"],
                                 seed=PREVIEW["preview_seed"], cfg_scale=PREVIEW["preview_cfg_scale"])


def start_and_watch(page, name: str) -> tuple[dict, list]:
    """Press Start; the progress texts seen while it trains, and the end state."""
    page.locator("#lora_trainer_btn_start").click()
    sync_api.expect(message(page)).to_contain_text("Training started")
    seen, deadline = [], time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        element = progress(page)
        status = element.get_attribute("data-status")
        if element.get_attribute("data-run") == name:
            seen.append((status, element.inner_text()))
            if status in ("finished", "stopped", "error"):
                break
        page.wait_for_timeout(150)
    return wait_status(page, name, "finished", "stopped", "error"), seen


def lora_cards(page, tabname: str = "txt2img"):
    top_tab(page, tabname).click()
    page.locator(f"#{tabname}_extra_tabs > .tab-nav > button", has_text=re.compile(r"^\s*Lora\s*$")).click()
    return page.locator(f"#{tabname}_lora_cards")


# ---- the tests ------------------------------------------------------------------------------------

def test_train_lora_is_a_top_level_tab_with_a_working_form(page, site, shots):
    tab = top_tab(page, "Train LoRA")
    sync_api.expect(tab).to_have_count(1)
    open_train_tab(page)
    # the WebUI's defaults: LoRAs go to its Lora folder, runs to <extension>/runs
    assert Path(box(page, "output_dir").input_value()) == site["data"] / "models" / "Lora"
    runs_folder = page.locator("#lora_trainer_runs_folder textarea, #lora_trainer_runs_folder input").first
    assert Path(runs_folder.input_value()) == site["extension"] / "runs"
    # the extension's style.css is on the page (the WebUI loads it) and its JavaScript ran
    assert page.evaluate("typeof window.loraTrainerCopy") == "function"
    # bad values: every problem listed next to the form, none about base_model (the loaded model)
    fill(page, resolution=10, train_data_dir="", learning_rate=5)
    page.locator("#lora_trainer_btn_start").click()
    problems = page.locator("#lora_trainer_problems")
    sync_api.expect(problems).to_be_visible()
    text = problems.inner_text()
    assert "Resolution (resolution)" in text and "Dataset folder (train_data_dir)" in text, text
    assert "Learning rate (learning_rate)" in text and "Base model" not in text, text
    assert "Traceback" not in text
    background = problems.evaluate("e => getComputedStyle(e).backgroundColor")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent"), "style.css is not applied"
    # the form and the side panel side by side, nothing wider than the page
    form, side = page.locator("#lora_trainer_form").bounding_box(), page.locator("#lora_trainer_side").bounding_box()
    assert form["x"] + form["width"] <= side["x"] + 1 and side["width"] > 300, (form, side)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.screenshot(path=str(shots / "webui_01_problems.png"))
    assert not page.js_errors, page.js_errors


def test_start_trains_the_loaded_model_with_previews(page, site, shots):
    before = model_state(site)
    open_train_tab(page)
    prompts = f"{PROMPT}\n{PROMPT} <lora:{{name}}:0.7>"
    train_form(page, site, "browser_lora", preview_prompts=prompts, preview_every_n_steps=30,
               max_train_steps=60)
    state, seen = start_and_watch(page, "browser_lora")
    assert state["status"] == "finished", (message(page).inner_text(), seen[-3:])
    assert state["step"] == state["total"] == 60 and "step 60/60" in state["text"]
    training = [text for status, text in seen if status == "training"]
    assert any(re.search(r"step ([1-9]|[1-5]\d)/60 · .* · loss", text) for text in training), seen
    # previews in the gallery; the result row offers the tag
    page.wait_for_selector("#lora_trainer_previews img")
    assert page.locator("#lora_trainer_previews img").count() >= 2
    sync_api.expect(box(page, "result_tag")).to_have_value("<lora:browser_lora:0.7>")
    lora = Path(box(page, "result_path").input_value())
    assert lora == site["data"] / "models" / "Lora" / "browser_lora.safetensors" and lora.is_file()
    page.screenshot(path=str(shots / "webui_02_finished.png"), full_page=True)
    # the same model object, bit-identical weights, nothing left attached: no reload happened
    assert model_state(site) == before
    # the final preview is what txt2img gives for the same prompt and settings
    final = site["extension"] / "runs" / "browser_lora" / "previews" / "000060"
    assert np.array_equal(pixels(final / "1.png"), txt2img(site, f"{PROMPT} <lora:browser_lora:0.7>"))
    assert np.array_equal(pixels(final / "0.png"), txt2img(site, PROMPT))
    assert (lora.with_suffix(".preview.png")).is_file()
    assert not page.js_errors, page.js_errors


def test_new_lora_is_on_the_lora_cards_with_its_thumbnail(page, site, shots):
    cards = lora_cards(page)
    card = cards.locator('.card[data-name="browser_lora"]')
    # the tab refreshed the cards when the run ended: no Refresh press needed
    sync_api.expect(card).to_have_count(1, timeout=30_000)
    assert page.evaluate("window.loraTrainerCardRefreshes") >= 1
    thumb = card.locator("img.preview")
    sync_api.expect(thumb).to_have_count(1)
    assert "browser_lora.preview.png" in (thumb.get_attribute("src") or "")
    thumb.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
    page.screenshot(path=str(shots / "webui_03_lora_cards.png"))
    # clicking the card puts the tag into the prompt, as for any LoRA
    card.click()
    sync_api.expect(page.locator("#txt2img_prompt textarea")).to_have_value(re.compile(r"<lora:browser_lora:"))
    page.locator("#txt2img_prompt textarea").fill("")


def test_a_run_without_preview_prompts_still_gets_a_card_thumbnail(page, site):
    open_train_tab(page)
    train_form(page, site, "browser_plain", preview_prompts="", max_train_steps=4)
    state, _ = start_and_watch(page, "browser_plain")
    assert state["status"] == "finished", message(page).inner_text()
    lora = site["data"] / "models" / "Lora" / "browser_plain.safetensors"
    thumbnail = lora.with_suffix(".preview.png")
    assert thumbnail.is_file(), "no card thumbnail for a run without preview prompts"
    # rendered once, at the end (nothing before or during training); the gallery shows it
    previews = site["extension"] / "runs" / "browser_plain" / "previews"
    assert sorted(p.name for p in previews.iterdir()) == ["000004"], list(previews.iterdir())
    assert np.array_equal(pixels(thumbnail), pixels(previews / "000004" / "0.png"))
    # of the LoRA itself: the card's activation text with <lora:name:0.7>, as txt2img renders it
    # (the WebUI's infotext keeps the prompt without its <lora:…> tags and names them under Lora hashes)
    info = Image.open(previews / "000004" / "0.png").info.get("parameters", "")
    assert info.startswith("lt_demo") and 'Lora hashes: "browser_plain: ' in info, info
    assert np.array_equal(pixels(thumbnail), txt2img(site, "lt_demo, <lora:browser_plain:0.7>"))
    sync_api.expect(page.locator("#lora_trainer_previews img")).to_have_count(2)   # the image + grid
    card = lora_cards(page).locator('.card[data-name="browser_plain"] img.preview')
    sync_api.expect(card).to_have_count(1, timeout=30_000)


def test_a_page_opened_after_an_unwatched_run_shows_its_card(page, site):
    """A run that ended while no page was open is on the next page's cards without Refresh: the
    tab's script refreshes them once for every run end the browser has not seen, and not again on
    every later page load (a refresh rescans every extra-network folder, slow for big libraries)."""
    page.goto("about:blank")                               # no page watches the run end
    browser = page.context.browser
    starter = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    open_webui(starter, site)
    open_train_tab(starter)
    train_form(starter, site, "browser_unseen", preview_prompts="", max_train_steps=4)
    starter.locator("#lora_trainer_btn_start").click()
    sync_api.expect(message(starter)).to_contain_text("Training started")
    starter.context.close()
    log = site["extension"] / "runs" / "browser_unseen" / "logs" / "train.log"
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while not (log.is_file() and "run finished" in log.read_text()):
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.5)
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    try:
        later = context.new_page()
        open_webui(later, site)
        card = lora_cards(later).locator('.card[data-name="browser_unseen"]')
        sync_api.expect(card).to_have_count(1, timeout=30_000)
        assert later.evaluate("window.loraTrainerCardRefreshes") == 1
        # the same browser again: that end was seen, so no second refresh
        again = context.new_page()
        open_webui(again, site)
        open_train_tab(again)
        sync_api.expect(progress(again)).to_have_attribute("data-run", "browser_unseen", timeout=30_000)
        again.wait_for_timeout(2500)     # the script looks once a second: give it two looks
        assert again.evaluate("window.loraTrainerCardRefreshes || 0") == 0
    finally:
        context.close()
        open_webui(page, site)


def test_stacking_with_another_lora(page, site, shots):
    # a second LoRA whose preview prompt names the first one as well
    open_train_tab(page)
    stacked = f"{PROMPT} <lora:browser_lora:0.7> <lora:{{name}}:0.5>"
    train_form(page, site, "browser_other", preview_prompts=stacked, max_train_steps=4, learning_rate=0.05,
               seed=7)
    state, _ = start_and_watch(page, "browser_other")
    assert state["status"] == "finished", message(page).inner_text()
    final = site["extension"] / "runs" / "browser_other" / "previews" / "000004" / "0.png"
    assert final.is_file()
    both = txt2img(site, f"{PROMPT} <lora:browser_lora:0.7> <lora:browser_other:0.5>")
    assert np.array_equal(pixels(final), both)         # the stacked preview is what txt2img gives
    one = txt2img(site, f"{PROMPT} <lora:browser_lora:0.7>")
    other = txt2img(site, f"{PROMPT} <lora:browser_other:0.5>")
    assert not np.array_equal(both, one) and not np.array_equal(both, other)
    assert model_state(site)["adapter_hosts"] == 0


def test_resume_after_the_webui_was_killed_mid_run(page, site, shots):
    from conftest import start_webui, stop_webui

    name = "browser_killed"
    run = site["extension"] / "runs" / name
    open_train_tab(page)
    train_form(page, site, name, max_train_steps=60, save_steps=2)
    page.locator("#lora_trainer_btn_start").click()
    sync_api.expect(message(page)).to_contain_text("Training started")
    deadline = time.monotonic() + 120
    while not any((c / "manifest.json").is_file() for c in (run / "checkpoints").glob("checkpoint-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    server = site["server"]
    server["process"].kill()                      # SIGKILL: no clean stop, no final save
    server["process"].wait(timeout=30)
    stop_webui(server)
    site["server"] = None
    log = run / "logs" / "train.log"
    assert "Finished" not in log.read_text(), "the run ended before the kill; make it longer"
    saved = sorted(int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("checkpoint-*")
                   if (c / "manifest.json").is_file())

    site["server"] = start_webui(site["root"], site["python"], site["data"], site["logs"] / "webui-2.log",
                                 site["env"])
    open_webui(page, site)
    open_train_tab(page)
    table = page.locator("#lora_trainer_runs_table").first
    sync_api.expect(table).to_contain_text(name)
    assert re.search(rf"{name}\s+{saved[-1]}\s", table.inner_text()), table.inner_text()
    choice = box(page, "runs_choice")
    choice.click()
    page.locator("#lora_trainer_runs_choice li", has_text=name).first.click()
    sync_api.expect(choice).to_have_value(re.compile(rf"{name}$"))
    # (no Escape to close the list: the WebUI's own script.js throws on Escape outside txt2img/img2img)
    page.screenshot(path=str(shots / "webui_04_runs_after_restart.png"))
    page.locator("#lora_trainer_btn_resume").click()
    sync_api.expect(message(page)).to_contain_text("Resuming")
    done = wait_status(page, name, "finished", "error")
    assert done["status"] == "finished" and done["step"] == done["total"] == 60, message(page).inner_text()
    resumed = re.findall(r"run resumed at step (\d+)", log.read_text())
    assert resumed and int(resumed[-1]) == saved[-1], (resumed, saved)
    assert (site["data"] / "models" / "Lora" / f"{name}.safetensors").is_file()
    assert model_state(site)["adapter_hosts"] == 0
    page.screenshot(path=str(shots / "webui_05_resumed.png"), full_page=True)
    assert not page.js_errors, page.js_errors
