"""The issue's outside attacks against a real A1111 v1.10.1 started with --listen (and without
--enable-insecure-extension-access): the gradio JSON route and the tab's Save/Load preset called by
fn_index, with outside folders, traversal in names and files whose content must not come back.
Skipped without LORA_TRAINER_WEBUI_DIR (see conftest.py); one WebUI server of its own.

The same tests run against a real Forge (tests/forge/test_real_forge_security.py imports them with
its own `listening` fixture, built with `listening_site`), so each works on gradio 3 and 4."""
from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from webui_harness import SKIP_REASON, WEBUI_DIR

pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON)

SECRET = "secret-first-line-do-not-echo"


@contextlib.contextmanager
def listening_site(tmp_path_factory, prepared: dict, start, stop):
    """What the attacks need: a server from `start(extra_args)` with --listen over `prepared`
    (its data folder, extension, dataset) and a folder outside everything the server may use."""
    outside = tmp_path_factory.mktemp("outside-home")
    (outside / "notes.csv").write_text(SECRET + "\nmore\n")
    (outside / "set").mkdir()
    server = start(("--listen",))
    try:
        config = _post(server["url"] + "/config", None, method="GET")
        yield {"url": server["url"], "data": prepared["data"], "extension": prepared["extension"],
               "outside": outside, "dataset": prepared["dataset"], "config": config}
    finally:
        stop(server)


@pytest.fixture(scope="module")
def listening(tmp_path_factory):
    from conftest import prepare_webui_data, start_webui, stop_webui

    data = tmp_path_factory.mktemp("webui-listen")
    prepared = prepare_webui_data(data)

    def start(extra_args):
        return start_webui(prepared["root"], prepared["python"], data, data / "webui.log", prepared["env"],
                           extra_args=extra_args)

    with listening_site(tmp_path_factory, prepared, start, stop_webui) as site:
        yield site


def _post(url: str, payload, method: str = "POST"):
    request = urllib.request.Request(url, data=None if payload is None else json.dumps(payload).encode(),
                                     method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:      # gradio answers a raised error with 500 + detail
        return {"http_status": error.code, "body": error.read().decode(errors="replace")}


def train_json(site, **values) -> str:
    """POST /run/lora_trainer_train_json as a script from outside would; the whole answer as text."""
    base = dict(train_data_dir=str(site["dataset"]), resolution=64, lora_rank=4, max_train_steps=1,
                save_steps=0, write_card=False, preview_prompts=[])
    base.update(values)
    return json.dumps(_post(site["url"] + "/run/lora_trainer_train_json",
                            {"data": ["task(security)", json.dumps(base)]}))


def files_under(folder: Path) -> set:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("values,field", [
    ({"output_dir": "{outside}"}, "output_dir"),
    ({"run_dir": "{outside}/run"}, "run_dir"),
    ({"output_name": "../evil_up"}, "output_name"),
    ({"output_name": "{outside}/abs_name"}, "output_name"),
    ({"cache_dir": "{outside}/cache"}, "cache_dir"),
    ({"metadata_path": "{outside}/notes.csv"}, "metadata_path"),
    ({"train_data_dir": "{outside}/set"}, "train_data_dir"),
    ({"init_lora_from": "{data}/../{outside_name}/notes.csv"}, "init_lora_from"),
])
def test_json_route_refuses_outside_paths(listening, values, field):
    site = listening
    filled = {k: v.format(outside=site["outside"], data=site["data"], outside_name=site["outside"].name)
              for k, v in values.items()}
    before_outside, before_models = files_under(site["outside"]), files_under(site["data"] / "models")
    answer = train_json(site, output_name=filled.pop("output_name", "security_probe"), **filled)
    assert field in answer and "finished" not in answer, answer
    assert SECRET not in answer
    if field in ("metadata_path", "train_data_dir", "init_lora_from"):
        assert "--enable-insecure-extension-access" in answer, answer
    assert files_under(site["outside"]) == before_outside
    assert files_under(site["data"] / "models") == before_models       # no evil_up.* next to Lora/


def _dependency(config, elem_id: str) -> tuple[int, dict]:
    """(fn_index, dependency) of the click on `elem_id`. gradio 3 numbers dependencies by position
    and lists target ids; gradio 4 (Forge) gives each an "id" and lists [target id, event] pairs."""
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id}
    for i, dep in enumerate(config["dependencies"]):
        targets = {t[0] if isinstance(t, list) else t for t in dep["targets"]}
        if targets & ids:
            return dep.get("id", i), dep
    raise AssertionError(f"no event on {elem_id}")


def _fn_index(config, elem_id: str) -> int:
    return _dependency(config, elem_id)[0]


def call_button(site, elem_id: str, first_value, **fields) -> str:
    """A tab button called by fn_index over /run/predict, inputs = first_value + the form."""
    config = site["config"]
    index, dep = _dependency(config, elem_id)
    by_id = {c["id"]: c.get("props", {}) for c in config["components"]}
    data = [first_value] + [fields.get(by_id[i].get("elem_id", "").replace("lora_trainer_", "", 1),
                                       by_id[i].get("value")) for i in dep["inputs"][1:]]
    return json.dumps(_post(site["url"] + "/run/predict", {"fn_index": index, "data": data, "session_hash": "s"}))


@pytest.mark.parametrize("name", ["../../../webui-user", "{outside}/preset", "..\\..\\webui-user",
                                  "webui-user.sh"])
def test_save_preset_by_fn_index_stays_in_the_presets_folder(listening, name):
    site = listening
    name = name.format(outside=site["outside"])
    before, before_outside = files_under(site["data"]), files_under(site["outside"])
    answer = call_button(site, "lora_trainer_btn_save_preset", name, train_data_dir=str(site["dataset"]))
    assert "Preset name" in answer and "Saved preset" not in answer, answer
    assert files_under(site["data"]) == before
    assert files_under(site["outside"]) == before_outside


def test_save_and_load_a_preset_by_name(listening):
    site = listening
    answer = call_button(site, "lora_trainer_btn_save_preset", "mine", train_data_dir=str(site["dataset"]),
                         output_name="from_preset")
    assert "Saved preset" in answer, answer
    assert (site["extension"] / "presets" / "mine.yaml").is_file()
    config = site["config"]
    index = _fn_index(config, "lora_trainer_btn_load_preset")
    loaded = json.dumps(_post(site["url"] + "/run/predict", {"fn_index": index, "data": ["mine"], "session_hash": "s"}))
    assert "from_preset" in loaded and "Loaded preset" in loaded
    outside = json.dumps(_post(site["url"] + "/run/predict",
                               {"fn_index": index, "data": [str(site["outside"] / "notes.csv")], "session_hash": "s"}))
    assert SECRET not in outside and "Preset name" in outside


def test_start_button_by_fn_index_follows_the_same_rules(listening):
    site = listening
    answer = call_button(site, "lora_trainer_btn_start", str(site["outside"] / "set"))
    assert "train_data_dir" in answer.replace("Dataset folder", "train_data_dir")
    assert "--enable-insecure-extension-access" in answer and "Starting" not in answer
