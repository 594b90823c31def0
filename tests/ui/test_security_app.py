"""The standalone app attacked from outside over HTTP (docs/security.md): another web site's
requests (a JSON POST, a "simple" text/plain POST, a preflight, a websocket), DNS rebinding, file
reads through `/file=`, presets by path, and --listen without a login. One app in this process on
127.0.0.1 and a free port; each test asserts both the refusal and that nothing was written."""
from __future__ import annotations

import json
import os
import socket

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from lora_trainer.ui import app as ui_app  # noqa: E402
from lora_trainer.ui import compat  # noqa: E402
from lora_trainer.ui.http_guard import gradio_temp_dir  # noqa: E402

SECRET = "secret-line-do-not-echo"
EVIL = "http://evil.example"
API_PREFIX = "gradio_api/" if compat.GRADIO_MAJOR >= 5 else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("secure_app")
    temp = tmp_path_factory.mktemp("gradio_temp")
    old = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR",)}
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    (work / "secret.txt").write_text(SECRET)
    cwd = os.getcwd()
    os.chdir(work)        # gradio 3.41 would serve every file under the cwd
    running = ui_app.launch(port=_free_port(), base_dir=work)
    try:
        config = httpx.get(running.url + "config").json()
        yield {"url": running.url, "work": work, "temp": temp, "config": config, "running": running}
    finally:
        running.close()
        os.chdir(cwd)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fn_index(config, elem_id: str) -> int:
    """The index of the event whose trigger has `elem_id` (targets are ids on gradio 3, [id, event]
    pairs on 4+)."""
    ids = {c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id}
    targets = [{t[0] if isinstance(t, list) else t for t in d["targets"]} for d in config["dependencies"]]
    return next(i for i, found in enumerate(targets) if found & ids)


def _api(served) -> str:
    """Where the API routes are: the root on gradio 3-4, `/gradio_api/` on 5+."""
    return served["url"] + API_PREFIX


def _call(served, body: dict, headers=None) -> httpx.Response:
    """Call a tab function by fn_index as a script would: `POST /run/predict` on gradio 3; through
    the queue on 4+ (`queue/join`, then the event stream), answered as a Response whose JSON has
    `data` like 3's."""
    if compat.IS_GRADIO_3:
        return httpx.post(served["url"] + "run/predict", json=body, headers=headers)
    api = _api(served)
    joined = httpx.post(api + "queue/join", json={**body, "event_data": None, "trigger_id": None},
                        headers=headers)
    if joined.status_code != 200:
        return joined
    with httpx.stream("GET", api + "queue/data", params={"session_hash": body["session_hash"]},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    output = message.get("output", {})
                    return httpx.Response(200, json={"data": output.get("data"), "error": output.get("error")})
    raise AssertionError("the queue never completed the call")


def _save_preset_body(config, name: str, **fields) -> dict:
    """What the page sends for Save preset: the preset name, then every form field's value
    (`fields`: values by field name instead of the defaults)."""
    dep = config["dependencies"][_fn_index(config, "lora_trainer_btn_save_preset")]
    values = {c["id"]: fields.get(c["props"].get("elem_id", "").replace("lora_trainer_", "", 1),
                                  c["props"].get("value")) for c in config["components"]}
    data = [name, *[values[i] for i in dep["inputs"][1:]]]
    return {"fn_index": _fn_index(config, "lora_trainer_btn_save_preset"), "data": data, "session_hash": "t"}


def _no_cors(response) -> None:
    assert not [h for h in response.headers if h.lower().startswith("access-control-allow")]


# ---- another web site -------------------------------------------------------------------------

def test_cross_origin_requests_are_refused_and_write_nothing(served):
    url, body = served["url"], _save_preset_body(served["config"], "../../pwned")
    attacks = [
        dict(json=body, headers={"Origin": EVIL}),
        # a "simple" request: no CORS preflight, the browser sends it whatever the answer
        dict(content=json.dumps(body), headers={"Origin": EVIL, "Content-Type": "text/plain"}),
        dict(json=body, headers={"Origin": "null"}),                       # sandboxed iframe
        dict(json=body, headers={"Origin": "http://127.0.0.1:1"}),          # another local port
        dict(json=body, headers={"Sec-Fetch-Site": "cross-site"}),
        dict(json=body, headers={"Host": "evil.example"}),                  # DNS rebinding
    ]
    for attack in attacks:
        response = httpx.post(url + "run/predict", **attack)
        assert response.status_code == 403, attack["headers"]
        response = httpx.post(_api(served) + "queue/join", **attack)
        assert response.status_code == 403, attack["headers"]
        _no_cors(response)
    preflight = httpx.options(_api(served) + "queue/join", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    _no_cors(preflight)
    assert not (served["work"].parent / "pwned.yaml").exists()


def test_same_origin_page_works_without_cors_headers(served):
    response = httpx.get(served["url"] + "config", headers={"Origin": served["url"].rstrip("/")})
    assert response.status_code == 200
    _no_cors(response)
    assert httpx.get(served["url"], headers={"Host": "localhost"}).status_code == 200


def test_cross_origin_queue_stream_is_refused(served):
    """gradio 4+: the queue's event stream; no other site may read a job's results."""
    response = httpx.get(_api(served) + "queue/data", params={"session_hash": "t"}, headers={"Origin": EVIL})
    assert response.status_code == 403
    _no_cors(response)


@pytest.mark.skipif(not compat.IS_GRADIO_3, reason="the queue is a websocket only on gradio 3")
def test_cross_origin_websocket_is_refused(served):
    from websockets.sync.client import connect

    ws_url = served["url"].replace("http://", "ws://") + "queue/join"
    with pytest.raises(Exception) as info:
        connect(ws_url, origin=EVIL, open_timeout=10)
    assert "403" in str(info.value)
    with connect(ws_url, origin=served["url"].rstrip("/"), open_timeout=10) as ws:   # the page itself
        assert "send_hash" in ws.recv(timeout=10)


# ---- files ----------------------------------------------------------------------------------------

def test_file_route_serves_only_gradio_copies(served):
    url, work, temp = served["url"], served["work"], served["temp"]
    own = temp / "preview.png"
    own.write_bytes(b"\x89PNG fake")
    (temp / "escape.txt").symlink_to(work / "secret.txt")
    for path in [work / "secret.txt", "secret.txt", f"{temp}/../{work.name}/secret.txt", temp / "escape.txt",
                 "http://evil.example/x"]:
        for route in {"file=", "file/", API_PREFIX + "file="}:
            response = httpx.get(f"{url}{route}{path}")
            assert response.status_code == 403, (route, path)
            assert SECRET not in response.text
    assert httpx.get(f"{url}proxy=http://evil.example/").status_code == 403
    assert httpx.get(f"{url}{API_PREFIX}file={own}").status_code != 403   # the guard lets gradio's own copies through


# ---- presets ----------------------------------------------------------------------------------------

def _message(response) -> str:
    assert response.status_code == 200, response.text
    return json.dumps(response.json()["data"])


@pytest.mark.parametrize("name", ["../outside", "/abs/lora_trainer_preset", "..\\outside", "webui-user.sh",
                                  "sub/inner", "C:\\x"])
def test_save_preset_is_refused_outside_the_presets_folder(served, name):
    before = {p for p in served["work"].parent.rglob("*")}
    text = _message(_call(served, _save_preset_body(served["config"], name)))
    assert "Preset name" in text and "Saved" not in text
    assert {p for p in served["work"].parent.rglob("*")} == before


def test_save_and_load_a_preset_by_name(served, tiny_sd1, shapes_dataset):
    body = _save_preset_body(served["config"], "mine.yaml", train_data_dir=str(shapes_dataset),
                             base_model=str(tiny_sd1["single_file"]))
    text = _message(_call(served, body))
    assert "Saved preset" in text and (served["work"] / "presets" / "mine.yaml").is_file()
    index = _fn_index(served["config"], "lora_trainer_btn_load_preset")
    loaded = _message(_call(served, {"fn_index": index, "data": ["mine"], "session_hash": "t"}))
    assert "Loaded preset" in loaded and str(shapes_dataset) in loaded


def test_load_errors_never_echo_file_content(served):
    presets = served["work"] / "presets"
    presets.mkdir(exist_ok=True)
    (presets / "broken.yaml").write_text(f"lora_rank: 4\n{SECRET}: [unclosed\n")
    index = _fn_index(served["config"], "lora_trainer_btn_load_preset")
    for name in ("broken", "../secret", "../secret.txt", str(served["work"] / "secret.txt")):
        text = _message(_call(served, {"fn_index": index, "data": [name], "session_hash": "t"}))
        assert SECRET not in text, name
        assert "Loaded" not in text
        if name == "broken":
            assert "not valid YAML at line 3" in text     # where, not what


def test_broken_preset_message_names_line_not_content(tmp_path):
    from lora_trainer.ui import presets

    bad = tmp_path / "broken.yaml"
    bad.write_text(f"lora_rank: 4\n{SECRET}: [unclosed\n")
    assert presets.yaml_syntax_problem(bad).startswith("not valid YAML at line")
    assert SECRET not in presets.yaml_syntax_problem(bad)


# ---- --listen ---------------------------------------------------------------------------------------

def test_listen_needs_a_login(capsys, tmp_path):
    from lora_trainer.cli import build_parser

    args = build_parser().parse_args(["ui", "--listen", "--port", str(_free_port())])
    assert args.func(args) == 2
    assert "--auth" in capsys.readouterr().err
    with pytest.raises(ui_app.UsageError, match="--auth"):
        ui_app.launch(listen=True)
    creds = tmp_path / "logins"
    creds.write_text("# users\nme:s3cret:with:colons\n")
    assert ui_app.logins_from_args(None, str(creds)) == [("me", "s3cret:with:colons")]
    with pytest.raises(ui_app.UsageError) as info:
        ui_app.parse_logins("me-without-password")
    assert "me-without-password" not in str(info.value)


def test_a_taken_port_is_an_error_not_a_traceback(capsys, tmp_path, monkeypatch):
    from lora_trainer.cli import build_parser

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = build_parser().parse_args(["ui", "--port", str(taken.getsockname()[1])])
        assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: port") and "in use" in err and "Traceback" not in err


def test_listen_with_a_login_refuses_anonymous_requests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    running = ui_app.launch(port=_free_port(), listen=True, base_dir=tmp_path, auth=[("me", "pw")])
    try:
        config_status = httpx.get(running.url + "config").status_code
        assert config_status in (401, 403)
        body = {"fn_index": 0, "data": [], "session_hash": "t"}
        for route in ("run/predict",) if compat.IS_GRADIO_3 else ("run/predict", "queue/join"):
            assert httpx.post(running.url + API_PREFIX + route, json=body).status_code in (401, 403)
        login = httpx.post(running.url + "login", data={"username": "me", "password": "pw"})
        assert login.status_code == 200 and any(c.startswith("access-token") for c in login.cookies)
        # a login does not make another site's requests acceptable
        assert httpx.get(running.url + "config", cookies=login.cookies,
                         headers={"Origin": EVIL}).status_code == 403
        assert httpx.get(running.url + "config", cookies=login.cookies).status_code == 200
    finally:
        running.close()


# ---- the tab's other handlers inside a remote-facing WebUI ----------------------------------------

def test_webui_tab_handlers_follow_the_request_rules(tmp_path, shapes_dataset, tiny_sd1):
    """Check dataset, Auto-label, the Runs list and Resume: the same rules as Start and the JSON
    route (a WebUI with --listen and no --enable-insecure-extension-access)."""
    import types

    from lora_trainer.config import config_from_dict, write_effective_config
    from lora_trainer.ui import fields
    from lora_trainer.ui.tab import TabSettings, _TabBuilder
    from lora_trainer.ui.worker import TrainingWorker
    from lora_trainer.webui import guard
    from lora_trainer.webui.env import WebuiEnv

    data = tmp_path / "webui"
    (data / "models" / "Lora").mkdir(parents=True)
    env = WebuiEnv(cmd_opts=types.SimpleNamespace(lora_dir=str(data / "models" / "Lora"), listen=True),
                   opts=types.SimpleNamespace(), models_path=str(data / "models"), data_path=str(data))
    ext = data / "extensions" / "lora_trainer"
    settings = TabSettings(mode="webui", base_dir=ext, required=("train_data_dir",), runs_folder=ext / "runs",
                           rules=lambda: guard.webui_rules(env), presets_folder=ext / "presets",
                           runs_roots=(ext / "runs",))
    started = []
    worker = TrainingWorker(trainer=lambda *a, **k: started.append(a))
    builder = _TabBuilder(settings, worker, {})
    builder.build()
    outside = config_from_dict({"train_data_dir": str(shapes_dataset), "base_model": str(tiny_sd1["single_file"]),
                                "output_name": "elsewhere"}, base_dir=tmp_path / "home")
    write_effective_config(outside)
    values = fields.config_to_values(outside, builder.form.names)

    checked = builder.on_check_data(*values)
    assert guard.INSECURE_FLAG in checked and "Data check of" not in checked
    labeled = builder.on_auto_label(str(tmp_path / "clip"), "", False, *values)
    assert guard.INSECURE_FLAG in labeled
    assert builder._runs_found(str(tmp_path / "home" / "runs"))[1] == []
    resumed = builder.on_resume(str(outside.run_dir), str(tmp_path / "home" / "runs"))
    assert "can only be resumed from" in resumed[-1] and not started
    assert guard.INSECURE_FLAG in builder.on_start(*values, False) and not started


@pytest.mark.parametrize("name", ["../evil_up", "..\\evil_up", "/abs/evil"])
def test_standalone_output_name_is_a_name(tmp_path, name):
    from lora_trainer.config import field_specs
    from lora_trainer.ui.tab import TabSettings, _TabBuilder
    from lora_trainer.ui.worker import TrainingWorker

    started = []
    builder = _TabBuilder(TabSettings(base_dir=tmp_path), TrainingWorker(trainer=lambda *a, **k: started.append(a)), {})
    builder.build()
    values = [f"{name}" if n == "output_name" else field_specs()[n].default for n in builder.form.names]
    from lora_trainer.ui import fields
    values = fields.raw_to_values(dict(zip(builder.form.names, values)), builder.form.names)
    message = builder.on_start(*values, False)
    assert "Output name" in message or "output_name" in message
    assert "must be a name" in message and not started
