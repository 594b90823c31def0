"""Every adapter type in the real WebUI (skipped without LORA_TRAINER_WEBUI_DIR), on the tiny SD1 and
the tiny SDXL: trained on the loaded model, the WebUI's own Lora extension loads the file and matches
every layer, its application of the file has the effect our adapters have in training, the
in-training preview is pixel for pixel what txt2img renders with `<lora:name:0.7>`, and a LoHa
stacked with a plain LoRA renders differently from either alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from webui_harness import PREVIEW_LIKE_TXT2IMG, SKIP_REASON, WEBUI_DIR, harness_train, http, pixels
import webui_harness

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

PROMPT = "lt_demo, a red circle"
TYPES = {
    "locon": dict(adapter_type="locon", conv_rank=2),
    "loha": dict(adapter_type="loha", target_modules="locon", lora_rank=2),
    "lokr": dict(adapter_type="lokr", target_modules="locon", lora_rank=2),
    "dora": dict(adapter_type="locon", dora=True),
}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def server(request, tmp_path_factory):
    """A WebUI of this module's own per family; pytest finishes every sd1 test (and stops that
    server) before it starts the sdxl one, so only one runs at a time."""
    if not WEBUI_DIR:
        pytest.skip(SKIP_REASON)
    if request.param == "sd1":
        from conftest import prepare_webui_data, start_webui, stop_webui

        data = tmp_path_factory.mktemp("webui-types-sd1")
        prepared = prepare_webui_data(data)
        started = start_webui(prepared["root"], prepared["python"], data, data / "webui.log", prepared["env"])
        try:
            yield {"url": started["url"], "data": data, "dataset": prepared["dataset"]}
        finally:
            stop_webui(started)
    else:
        from test_real_webui_sdxl import serve_tiny_model
        from tiny_sdxl_model import write_tiny_sdxl_model

        yield from serve_tiny_model(tmp_path_factory, write_tiny_sdxl_model, "tiny-sdxl")


def trained(server, name: str, **values) -> dict:
    result = harness_train(server["url"], server["dataset"], output_name=name, train_text_encoder=True,
                           preview_every_n_steps=10, **PREVIEW_LIKE_TXT2IMG, **values)
    assert result["status"] == "finished", result
    return result


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_loads_matches_and_previews_as_txt2img_renders_it(server, kind):
    name = f"types_{kind}"
    before = webui_harness.model_state(server["url"])
    result = trained(server, name, preview_prompts=[f"{PROMPT} <lora:{{name}}:0.7>"], **TYPES[kind])
    assert webui_harness.model_state(server["url"]) == before
    matched = http("GET", server["url"] + f"/lora_trainer_test/matched/{name}")
    print(f"{kind}: {matched}")
    assert matched["file_layers"] == matched["matched"] > 0 and matched["text_encoder_layers"] > 0, matched
    effect = http("GET", server["url"] + f"/lora_trainer_test/effect/{name}")
    print(f"{kind}: in training vs the WebUI's application {effect}")
    assert effect["unmatched"] == 0 and effect["effect"] > 1e-4 * max(1.0, effect["scale"]), effect
    assert effect["ours_vs_webui"] <= 1e-5 * max(1.0, effect["scale"]), effect
    preview = pixels(Path(result["run_dir"]) / "previews" / "000010" / "0.png")
    rendered = webui_harness.txt2img(server["url"], f"{PROMPT} <lora:{name}:0.7>")
    base = webui_harness.txt2img(server["url"], PROMPT)
    assert np.abs(rendered - base).max() > 0, "the LoRA does not change the image"
    assert np.array_equal(preview, rendered)
    assert webui_harness.model_state(server["url"])["digest"] == before["digest"]


def test_a_loha_stacked_with_a_plain_lora(server):
    loha = trained(server, "stack_loha", **TYPES["loha"], preview_prompts=[])
    plain = trained(server, "stack_plain", seed=7, preview_prompts=[])
    url = server["url"]
    base = webui_harness.txt2img(url, PROMPT)
    one = webui_harness.txt2img(url, f"{PROMPT} <lora:stack_loha:0.7>")
    other = webui_harness.txt2img(url, f"{PROMPT} <lora:stack_plain:0.7>")
    both = webui_harness.txt2img(url, f"{PROMPT} <lora:stack_loha:0.7> <lora:stack_plain:0.7>")
    print(f"stack: loha vs base {np.abs(one - base).max()}, plain vs base {np.abs(other - base).max()}, "
          f"both vs loha {np.abs(both - one).max()}, both vs plain {np.abs(both - other).max()}")
    for image in (one, other):
        assert np.abs(image - base).max() > 0
        assert np.abs(both - image).max() > 0
    # the preview stacks them the same way (the trained LoRA plus another from the Lora folder)
    stacked = trained(server, "stack_loha2", **TYPES["loha"],
                      preview_prompts=[f"{PROMPT} <lora:{{name}}:0.7> <lora:stack_plain:0.7>"])
    preview = pixels(Path(stacked["run_dir"]) / "previews" / "000010" / "0.png")
    assert np.array_equal(preview, webui_harness.txt2img(url, f"{PROMPT} <lora:stack_loha2:0.7> "
                                                              "<lora:stack_plain:0.7>"))
