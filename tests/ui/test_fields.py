"""The form built from the config schema: one component per field, unique labels, and form values
that round-trip to an equal config. No browser needed."""
from __future__ import annotations

import dataclasses

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.config import ConfigError, config_from_dict, dump_config, field_specs  # noqa: E402
from lora_trainer.ui import compat, fields, runs, views  # noqa: E402
from lora_trainer.ui.tab import build_tab  # noqa: E402
from lora_trainer.ui.worker import TrainingWorker  # noqa: E402


def _all_blocks(blocks):
    return list(blocks.blocks.values())


@pytest.fixture(scope="module")
def tab():
    return build_tab(mode="standalone", worker=TrainingWorker(trainer=lambda *a, **k: None))


@pytest.fixture
def paths(tiny_sd1, shapes_dataset, tmp_path):
    # output_dir explicit: a default path is not resolved by config_from_dict, the form's always is
    return {"train_data_dir": str(shapes_dataset), "base_model": str(tiny_sd1["single_file"]),
            "output_dir": str(tmp_path / "output")}


def test_every_field_has_a_component_with_its_elem_id(tab):
    by_id = {getattr(b, "elem_id", None): b for b in _all_blocks(tab)}
    for name, spec in field_specs().items():
        component = by_id.get(f"lora_trainer_{name}")
        assert component is not None, f"no component for {name}"
        expected = {"checkbox": gr.Checkbox, "dropdown": gr.Dropdown, "number": gr.Number,
                    "number_text": gr.Textbox, "lines": gr.Textbox, "path": gr.Textbox, "text": gr.Textbox}[fields.kind_of(spec)]
        assert isinstance(component, expected), (name, type(component))


def test_component_kinds_follow_the_metadata():
    specs = field_specs()
    assert fields.kind_of(specs["random_crop"]) == "checkbox"
    assert fields.kind_of(specs["optimizer"]) == "dropdown"
    assert fields.kind_of(specs["resolution"]) == "number"
    assert fields.kind_of(specs["learning_rate"]) == "number"
    assert fields.kind_of(specs["max_train_steps"]) == "number_text"   # optional: empty = default
    assert fields.kind_of(specs["preview_prompts"]) == "lines"
    assert fields.kind_of(specs["train_data_dir"]) == "path"
    assert fields.kind_of(specs["output_name"]) == "text"


def test_elem_ids_are_unique_in_the_tab(tab):
    ids = [b.elem_id for b in _all_blocks(tab) if getattr(b, "elem_id", None)]
    assert all(i.startswith("lora_trainer_") for i in ids)
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_labels_are_unique_in_the_tab(tab):
    """The WebUI's ui-config.json keys components by label, so duplicates would collide."""
    labels = [b.label for b in _all_blocks(tab) if getattr(b, "label", None)]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    assert not duplicates, duplicates


def test_advanced_fields_are_folded(tab):
    accordions = {getattr(b, "elem_id", None): b for b in _all_blocks(tab) if isinstance(b, gr.Accordion)}
    assert accordions["lora_trainer_group_data_advanced"].open is False
    assert accordions["lora_trainer_group_advanced"].open is False
    assert accordions["lora_trainer_group_data"].open is True


def _form_values(cfg):
    return fields.config_to_values(cfg)


def test_default_form_round_trips(tmp_path, paths):
    cfg = config_from_dict(paths, base_dir=tmp_path)
    names = list(field_specs())
    again = config_from_dict(fields.form_to_dict(_form_values(cfg), names), base_dir=tmp_path)
    assert again == cfg


def test_non_default_form_round_trips(tmp_path, paths, tiny_sd1):
    raw = dict(paths, metadata_path=None, repeats=3, resolution=64, random_crop=True, min_bucket_reso=64,
               max_upscale_factor=3.5, cache_dir=str(tmp_path / "cache"), shuffle_caption=True,
               keep_tokens=1, caption_dropout_rate=0.25, bad_image_policy="skip",
               base_model_config=str(tiny_sd1["config_folder"]), output_dir=str(tmp_path / "out"),
               output_name="round trip", save_precision="bf16", trigger_word="zzt",
               lora_rank=4, lora_alpha=2.5, target_modules="locon", conv_rank=2, train_text_encoder=True,
               batch_size=2, max_train_steps=17, learning_rate=3e-4, text_encoder_lr=5e-5,
               lr_scheduler="cosine", max_grad_norm=None, mixed_precision="bf16", seed=7,
               min_snr_gamma=5.0, prediction_type="v_prediction", device="cpu", save_steps=5,
               preview_prompts=["a red circle --s 4", "a blue square, <lora:round trip:0.5>"],
               preview_every_n_steps=3, preview_weight_sweep=[0.0, 0.4, 1.0], preview_width=64,
               preview_negative_prompt="blurry", write_card=False, tensorboard=False, num_threads=2)
    raw = {k: v for k, v in raw.items() if k in field_specs()}
    cfg = config_from_dict(raw, base_dir=tmp_path)
    names = list(field_specs())
    values = _form_values(cfg)
    assert values[names.index("preview_prompts")] == "a red circle --s 4\na blue square, <lora:round trip:0.5>"
    assert values[names.index("prediction_type")] == "v_prediction"
    assert values[names.index("max_grad_norm")] == ""
    assert values[names.index("text_encoder_lr")] == "5e-05"
    again = config_from_dict(fields.form_to_dict(values, names), base_dir=tmp_path)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_blank_optional_values_mean_default(tmp_path, paths):
    names = list(field_specs())
    values = _form_values(config_from_dict(paths, base_dir=tmp_path))
    values[names.index("prediction_type")] = fields.DEFAULT_CHOICE
    values[names.index("max_train_steps")] = None
    values[names.index("trigger_word")] = "   "
    values[names.index("preview_weight_sweep")] = "0, 0.5\n1"
    cfg = config_from_dict(fields.form_to_dict(values, names), base_dir=tmp_path)
    assert cfg.prediction_type is None and cfg.max_train_steps is None and cfg.trigger_word is None
    assert cfg.preview_weight_sweep == [0.0, 0.5, 1.0]


def test_bad_values_list_every_problem(tmp_path):
    names = list(field_specs())
    cfg_values = fields.config_to_values(config_from_dict(
        {"train_data_dir": str(tmp_path), "base_model": str(tmp_path)}, base_dir=tmp_path))
    cfg_values[names.index("train_data_dir")] = ""
    cfg_values[names.index("resolution")] = 10
    cfg_values[names.index("learning_rate")] = 5.0
    with pytest.raises(ConfigError) as info:
        config_from_dict(fields.form_to_dict(cfg_values, names, ("train_data_dir", "base_model")),
                         base_dir=tmp_path)
    html = views.problems_html(info.value)
    for text in ("Dataset folder (train_data_dir)", "Resolution (resolution)", "Learning rate (learning_rate)",
                 "3 problems"):
        assert text in html
    assert "Traceback" not in html


def test_webui_mode_does_not_require_a_base_model(tmp_path, shapes_dataset):
    names = list(field_specs())
    values = fields.config_to_values({"train_data_dir": str(shapes_dataset)})
    raw = fields.form_to_dict(values, names, required=("train_data_dir",))
    assert "base_model" not in raw
    cfg = config_from_dict(raw, base_dir=tmp_path, required=("train_data_dir",))
    assert cfg.base_model == ""


def test_defaults_prefill_the_form(tmp_path):
    shown = fields.initial_values({"output_dir": str(tmp_path), "resolution": "768", "nonsense": 1})
    assert shown["output_dir"] == str(tmp_path) and shown["resolution"] == 768.0


def test_runs_list_and_resume_config(tmp_path, paths):
    from lora_trainer.config import write_effective_config

    cfg = config_from_dict(dict(paths, output_name="a", resume=False), base_dir=tmp_path)
    write_effective_config(cfg)
    (tmp_path / "runs" / "not_a_run").mkdir()
    found = runs.find_runs([tmp_path / "runs", tmp_path / "missing"])
    assert [r.name for r in found] == ["a"]
    assert found[0].step is None and found[0].resumable
    resumed = runs.resume_config(found[0].path)
    assert resumed.resume is True and resumed.run_dir == cfg.run_dir
    assert dataclasses.replace(resumed, resume=False) == cfg


def test_run_to_resume_lists_names_and_resumes_their_folders(tmp_path, paths):
    """The Run to resume box shows a run of the runs folder by name (in the WebUI the full path
    starts with the long extension folder, and every choice looked the same); Resume gets its folder."""
    from lora_trainer.config import write_effective_config
    from lora_trainer.ui.tab import TabSettings, _TabBuilder

    cfg = config_from_dict(dict(paths, output_name="a"), base_dir=tmp_path)
    write_effective_config(cfg)
    builder = _TabBuilder(TabSettings(base_dir=tmp_path), TrainingWorker(trainer=lambda *a, **k: None), {})
    folder = str(tmp_path / "runs")
    _, choices = builder._runs_found(folder)
    assert choices == ["a"]
    assert builder._run_dir_of("a", folder) == str(cfg.run_dir)
    elsewhere = str(tmp_path / "elsewhere" / "b")
    assert builder._run_label(elsewhere, folder) == elsewhere == builder._run_dir_of(elsewhere, folder)


def test_start_with_force_resume_continues_a_run_with_more_steps(tmp_path, paths):
    """The tab's 'Continue the run with changed settings' box is the CLI's --force-resume: more
    steps for a finished run are refused without it (the message names the box) and continue
    the same run with it."""
    from lora_trainer.ui.tab import TabSettings, _TabBuilder
    from lora_trainer.ui.worker import default_trainer

    builder = _TabBuilder(TabSettings(base_dir=tmp_path), TrainingWorker(default_trainer), {})
    builder.build()

    def start(force: bool, **values):
        cfg = config_from_dict(dict(paths, output_name="more", epochs=10, resolution=64, lora_rank=4,
                                    save_steps=0, num_threads=1, cache_latents_to_disk=False, **values),
                               base_dir=tmp_path)
        builder.on_start(*fields.config_to_values(cfg, builder.form.names), force)
        assert builder.worker.join(120)
        return builder.worker.snapshot()

    assert (start(False, max_train_steps=2).status, builder.worker.snapshot().step) == ("finished", 2)
    refused = start(False, max_train_steps=3)
    assert refused.status == "error" and "Continue the run with changed settings" in refused.error
    forced = start(True, max_train_steps=3)
    assert (forced.status, forced.step) == ("finished", 3)
    assert "run resumed at step 2 of 3" in (tmp_path / "runs" / "more" / "logs" / "train.log").read_text()


def test_resume_config_of_a_webui_run_without_base_model(tmp_path, paths):
    """A run the WebUI tab started records `base_model: ''` (it trains the loaded model); the Runs
    list's Resume must read that back, not refuse it as an empty path."""
    from lora_trainer.config import write_effective_config

    values = {k: v for k, v in paths.items() if k != "base_model"}
    cfg = config_from_dict(dict(values, output_name="w"), base_dir=tmp_path, required=("train_data_dir",))
    assert cfg.base_model == ""
    write_effective_config(cfg)
    resumed = runs.resume_config(cfg.run_dir, required=("train_data_dir",))
    assert resumed.base_model == "" and resumed.run_dir == cfg.run_dir and resumed.resume
    with pytest.raises(ConfigError, match="base_model"):     # where it is required, still refused
        runs.resume_config(cfg.run_dir)


def test_compat_drops_unknown_arguments():
    box = compat.make(gr.Textbox, label="x", definitely_not_an_argument=1)
    assert box.label == "x"
    assert compat.js_kwargs("() => 1") in ({"_js": "() => 1"}, {"js": "() => 1"})


def test_webui_mode_builds_with_the_webui_defaults(tmp_path):
    blocks = build_tab(mode="webui", defaults={"output_dir": str(tmp_path / "Lora"), "preview_steps": 12},
                       worker=TrainingWorker(trainer=lambda *a, **k: None), base_dir=tmp_path)
    by_id = {getattr(b, "elem_id", None): b for b in _all_blocks(blocks)}
    assert by_id["lora_trainer_output_dir"].value == str(tmp_path / "Lora")
    assert by_id["lora_trainer_preview_steps"].value == 12


def _dependency_fn(blocks, api_name: str):
    """(config dependency, python function) of the event registered with `api_name`."""
    deps = blocks.get_config_file()["dependencies"]
    index = next(i for i, d in enumerate(deps) if d.get("api_name") == api_name)
    fns = blocks.fns if isinstance(blocks.fns, list) else list(blocks.fns.values())
    return deps[index], fns[index].fn


def test_webui_mode_exposes_the_json_training_api(tmp_path, monkeypatch):
    """A hidden button with api_name="lora_trainer_train_json" running job.make_json_train_handler
    (wrapped in the WebUI's wrap_gradio_gpu_call); not in the standalone app or outside the WebUI."""
    import json
    import sys
    import types

    from lora_trainer.webui import job

    wrapped = []
    call_queue = types.ModuleType("modules.call_queue")

    def wrap_gradio_gpu_call(fn, extra_outputs=None):
        wrapped.append(extra_outputs)
        return fn

    call_queue.wrap_gradio_gpu_call = wrap_gradio_gpu_call
    modules = types.ModuleType("modules")
    modules.call_queue = call_queue
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.call_queue", call_queue)
    result = types.SimpleNamespace(status="finished", step=3, total_steps=3, lora_path=tmp_path / "a.safetensors",
                                   run_dir=tmp_path / "runs" / "a", message="Finished <3> steps")
    seen = []
    monkeypatch.setattr(job, "train_from_json", lambda text: seen.append(json.loads(text)) or result)

    blocks = build_tab(mode="webui", worker=TrainingWorker(trainer=lambda *a, **k: None), base_dir=tmp_path)
    dep, fn = _dependency_fn(blocks, "lora_trainer_train_json")
    assert len(dep["inputs"]) == 2 and len(dep["outputs"]) == 2 and wrapped == [[""]]
    by_id = {b._id: b for b in _all_blocks(blocks)}
    assert [type(by_id[i]).__name__ for i in dep["outputs"]] == ["Textbox", "HTML"]
    assert not any(getattr(by_id[i], "visible", True) for i in [*dep["inputs"], *dep["outputs"]])
    payload, status_html = fn("task(1)", json.dumps({"train_data_dir": "x"}))
    assert seen == [{"train_data_dir": "x"}]
    assert json.loads(payload) == {"status": "finished", "step": 3, "total_steps": 3,
                                   "lora_path": str(result.lora_path), "run_dir": str(result.run_dir),
                                   "message": "Finished <3> steps"}
    assert status_html == "<p>Finished &lt;3&gt; steps</p>"

    standalone = build_tab(mode="standalone", worker=TrainingWorker(trainer=lambda *a, **k: None))
    assert not any(d.get("api_name") == "lora_trainer_train_json"
                   for d in standalone.get_config_file()["dependencies"])
    monkeypatch.setitem(sys.modules, "modules", None)           # outside the WebUI: no endpoint
    monkeypatch.setitem(sys.modules, "modules.call_queue", None)
    plain = build_tab(mode="webui", worker=TrainingWorker(trainer=lambda *a, **k: None), base_dir=tmp_path)
    assert not any(d.get("api_name") == "lora_trainer_train_json"
                   for d in plain.get_config_file()["dependencies"])


def test_worker_runs_one_training_at_a_time(tmp_path, paths):
    import threading

    from lora_trainer.ui.worker import TrainingWorker

    release = threading.Event()

    class Result:
        status, step, total_steps, message = "finished", 3, 3, "done"
        lora_path = tmp_path / "x.safetensors"

    def trainer(cfg, control, observers, force_resume=False):
        observers[0].on_start({"total_steps": 3, "start_step": 0})
        release.wait(10)
        return Result()

    worker = TrainingWorker(trainer)
    cfg = config_from_dict(paths, base_dir=tmp_path)
    assert not worker.stop() and not worker.save_now()      # nothing to stop yet
    assert worker.start(cfg)[0]
    ok, text = worker.start(cfg)
    assert not ok and "already active" in text
    assert worker.save_now() and worker.preview_now()
    assert worker._control.save_now.is_set() and worker._control.preview_now.is_set()
    release.set()
    assert worker.join(10)
    snap = worker.snapshot()
    assert snap.status == "finished" and snap.lora_path.endswith("x.safetensors")
    assert views.result_values(snap)[1] == "<lora:x:0.7>"
    # the server's time of the end, for the page's one Lora-card refresh per run end
    import time
    assert abs(snap.ended_wall - time.time()) < 60
    assert f'data-ended="{snap.ended_wall}"' in views.progress_html(snap)


def test_log_tail_shows_console_and_step_lines_not_train_log_internals(tmp_path, paths):
    import logging

    from lora_trainer.monitor import run_log

    def trainer(cfg, control, observers, force_resume=False):
        logging.getLogger("lora_trainer").info("Previews at step 2: 1 prompt(s)")
        run_log._info("event checkpoint: step %d -> %s", 2, "ckpt")
        run_log._info("effective config:\n%s", "a: 1")
        run_log._info("step %d/%d loss %.3f", 2, 4, 0.5, extra=run_log.PROGRESS_LINE)
        raise RuntimeError("stop here")

    worker = TrainingWorker(trainer)
    worker.start(config_from_dict(paths, base_dir=tmp_path))
    assert worker.join(10)
    lines = worker.snapshot().log_lines
    assert "Previews at step 2: 1 prompt(s)" in lines and "step 2/4 loss 0.500" in lines
    assert not any(line.startswith(("event ", "effective config")) for line in lines), lines


def test_worker_shows_errors_as_a_message(tmp_path, paths):
    def trainer(cfg, control, observers, force_resume=False):
        raise RuntimeError("the model exploded")

    worker = TrainingWorker(trainer)
    worker.start(config_from_dict(paths, base_dir=tmp_path))
    assert worker.join(10)
    snap = worker.snapshot()
    assert snap.status == "error" and snap.error == "RuntimeError: the model exploded"
    assert "Traceback" not in views.log_text(snap)


def test_ui_command_listens_on_localhost_unless_told(monkeypatch, capsys):
    from lora_trainer.cli import build_parser
    from lora_trainer.ui import app, serve

    args = build_parser().parse_args(["ui", "--port", "7999"])
    assert args.func is app.cmd_ui and args.port == 7999 and not args.listen
    launched = []
    monkeypatch.setattr(app, "create_app", lambda defaults=None, base_dir=None: object())
    monkeypatch.setattr(serve, "serve", lambda blocks, host, port, **kw: launched.append((host, port, kw))
                        or serve.RunningApp(blocks, None, None, f"http://{host}:{port}/"))
    app.launch(port=7999, listen=False)
    assert launched[-1][:2] == ("127.0.0.1", 7999) and "WARNING" not in capsys.readouterr().err
    app.launch(port=7999, listen=True, auth=[("me", "pw")])
    assert launched[-1][:2] == ("0.0.0.0", 7999) and launched[-1][2]["auth"] == [("me", "pw")]
    assert "WARNING: --listen" in capsys.readouterr().err
