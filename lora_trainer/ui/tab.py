"""The "Train LoRA" tab: `build_tab(mode, defaults) -> gr.Blocks`.

The same Blocks is launched by `lora-trainer ui` (mode="standalone") and returned from the
WebUI's `on_ui_tabs` (mode="webui"). Layout:

    [preset file] [Load preset] [Save preset]
    form (one accordion per schema group)     | message box (problems, results)
                                              | Start  Stop  Save now  Preview now  Check data
                                              | progress, loss curve, previews, LoRA + tag, log
                                              | runs list + Resume

Every element id starts with `lora_trainer_`; field components are `lora_trainer_<field>`.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

from ..config import REQUIRED_KEYS, ConfigError, config_from_dict, dump_config, load_config, resolve_path
from ..config.load import field_specs
from . import compat, fields, runs, views
from .worker import Snapshot, TrainingWorker, default_worker

log = logging.getLogger("lora_trainer")

POLL_SECONDS = 1.0
REPO_ROOT = Path(__file__).resolve().parents[2]
CSS_FILE = REPO_ROOT / "style.css"
JS_FILE = REPO_ROOT / "javascript" / "lora_trainer.js"
DATA_KEYS = ("train_data_dir", "metadata_path", "caption_extension", "repeats", "resolution")

COPY_JS = ("(tag) => { if (window.loraTrainerCopy) { window.loraTrainerCopy(tag, 'lora_trainer_btn_copy_tag'); }"
           " else if (navigator.clipboard) { navigator.clipboard.writeText(tag); } return []; }")


def read_asset(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


@dataclasses.dataclass
class TabSettings:
    """What differs between the standalone app and the WebUI."""
    mode: str = "standalone"
    base_dir: Path = dataclasses.field(default_factory=Path.cwd)   # relative paths in the form
    required: tuple = tuple(REQUIRED_KEYS)
    runs_folder: Optional[Path] = None
    # raw form dict -> TrainConfig (raises ConfigError); default: config_from_dict
    config_builder: Optional[Callable[[dict], Any]] = None
    # (task id, config JSON) -> (result JSON, HTML) for the hidden API button (WebUI mode)
    json_handler_factory: Optional[Callable[[], Callable]] = None


def _webui_settings(base_dir: Optional[Path]) -> tuple[TabSettings, Optional[Callable]]:
    """In the WebUI, training runs on the loaded model (base_model is optional) while holding the
    WebUI's GPU lock, with the config completed by the WebUI's defaults (lora_trainer.webui).
    Returns (settings, trainer); the trainer is None when lora_trainer.webui cannot be imported."""
    try:
        from ..webui import job, paths
    except ImportError:
        folder = Path(base_dir or Path.cwd())
        return TabSettings(mode="webui", base_dir=folder, required=("train_data_dir",),
                           runs_folder=folder / "runs"), None

    def build_config(raw: dict):
        from ..webui.env import WebuiEnv
        return job.build_webui_config(raw, WebuiEnv.current(with_model=False))

    def train_in_webui(cfg, control, observers, force_resume=False):
        from modules import call_queue, shared  # the WebUI's FIFO lock around all GPU work
        with call_queue.queue_lock:
            # as wrap_gradio_gpu_call does: a fresh job state, so an Interrupt left over from an
            # earlier generation neither stops this run at once nor empties its previews
            shared.state.begin(job="train-lora")
            try:
                return job.train_on_loaded_model(cfg, control=control, observers=observers,
                                                 force_resume=force_resume)
            finally:
                shared.state.end()

    folder = Path(base_dir or paths.extension_dir())
    settings = TabSettings(mode="webui", base_dir=folder, required=("train_data_dir",),
                           runs_folder=folder / "runs", config_builder=build_config,
                           json_handler_factory=job.make_json_train_handler)
    return settings, train_in_webui


def build_tab(mode: str = "standalone", defaults: Optional[Mapping[str, Any]] = None, *,
              worker: Optional[TrainingWorker] = None, base_dir=None, trainer=None,
              settings: Optional[TabSettings] = None):
    """The whole tab as a gr.Blocks (usable from the WebUI's `on_ui_tabs` or launched as is).

    mode      "standalone" (base model from the form, trains with `train_from_config`) or
              "webui" (trains the WebUI's loaded model; base_model may stay empty).
    defaults  raw field values the form starts with (e.g. output_dir = the WebUI's Lora folder).
    worker    the TrainingWorker to use (default: one per process, shared by every page).
    trainer   trainer(cfg, control, observers, force_resume) for a new worker.
    """
    if mode not in ("standalone", "webui"):
        raise ValueError(f"mode must be 'standalone' or 'webui', not {mode!r}")
    webui_trainer = None
    if settings is None:
        if mode == "webui":
            settings, webui_trainer = _webui_settings(Path(base_dir) if base_dir else None)
        else:
            settings = TabSettings(base_dir=Path(base_dir or Path.cwd()))
    if worker is None:
        if trainer is not None:
            worker = TrainingWorker(trainer)
        elif webui_trainer is not None:
            worker = _webui_worker(webui_trainer)
        else:
            worker = default_worker()
    return _TabBuilder(settings, worker, defaults).build()


_WEBUI_WORKER: Optional[TrainingWorker] = None


def _webui_worker(trainer) -> TrainingWorker:
    """One worker for the WebUI process: "Reload UI" builds the tab again, and the new page must
    see (and be able to stop) a run the old one started."""
    global _WEBUI_WORKER
    if _WEBUI_WORKER is None:
        _WEBUI_WORKER = TrainingWorker(trainer)
    return _WEBUI_WORKER


class _TabBuilder:
    def __init__(self, settings: TabSettings, worker: TrainingWorker, defaults):
        self.settings = settings
        self.worker = worker
        self.defaults = dict(defaults or {})

    # ---- layout -------------------------------------------------------------------------------
    def build(self):
        import gradio as gr

        css = read_asset(CSS_FILE) if self.settings.mode == "standalone" else None
        blocks = compat.blocks(css=css, title="Train LoRA")
        blocks.lora_trainer_css = css   # for compat.launch on gradio 6+
        with blocks:
            with gr.Row(elem_id="lora_trainer_preset_row"):
                self.preset_path = compat.make(
                    gr.Textbox, label="Preset file (YAML)", elem_id="lora_trainer_preset_path",
                    placeholder="presets/my_lora.yaml", lines=1, max_lines=1, scale=4)
                self.load_btn = compat.make(gr.Button, value="Load preset", elem_id="lora_trainer_btn_load_preset",
                                            scale=1)
                self.save_btn = compat.make(gr.Button, value="Save preset", elem_id="lora_trainer_btn_save_preset",
                                            scale=1)
            with compat.make(gr.Row, elem_id="lora_trainer_main", equal_height=False):
                with compat.make(gr.Column, scale=3, elem_id="lora_trainer_form", min_width=320):
                    self.form = fields.build_form(self.defaults, self.settings.required)
                with compat.make(gr.Column, scale=2, elem_id="lora_trainer_side", min_width=320):
                    self._build_side(gr)
            self._wire(gr, blocks)
        return blocks

    def _build_side(self, gr) -> None:
        self.message = compat.make(gr.HTML, value=views.message_html(), elem_id="lora_trainer_message")
        with gr.Row(elem_id="lora_trainer_controls"):
            self.start_btn = compat.make(gr.Button, value="Start training", variant="primary",
                                         elem_id="lora_trainer_btn_start")
            self.stop_btn = compat.make(gr.Button, value="Stop", variant="stop", elem_id="lora_trainer_btn_stop")
            self.save_now_btn = compat.make(gr.Button, value="Save now", elem_id="lora_trainer_btn_save_now")
            self.preview_now_btn = compat.make(gr.Button, value="Preview now",
                                               elem_id="lora_trainer_btn_preview_now")
            self.check_btn = compat.make(gr.Button, value="Check dataset", elem_id="lora_trainer_btn_check_data")
        # the CLI's --force-resume: Start continues the run in run_dir even though settings that
        # change the training changed (more steps, another learning rate, edited captions)
        self.force_resume = compat.make(gr.Checkbox, value=False, label="Continue the run with changed "
                                        "settings (force resume, e.g. more steps)",
                                        elem_id="lora_trainer_force_resume")
        self.progress = compat.make(gr.HTML, value=views.progress_html(self.worker.snapshot()),
                                    elem_id="lora_trainer_progress")
        self.plot = compat.line_plot(value=None, x="step", y="loss", title="Training loss",
                                     x_title="step", y_title="loss", height=220, width=420,
                                     label="Loss curve", elem_id="lora_trainer_loss_plot",
                                     show_label=False)
        self.gallery = compat.make(gr.Gallery, value=None, label="Latest previews",
                                   elem_id="lora_trainer_previews", columns=4, height=260,
                                   object_fit="contain", preview=False)
        with gr.Row(elem_id="lora_trainer_result_row"):
            self.lora_path_box = compat.make(gr.Textbox, value="", label="Finished LoRA file", lines=1,
                                             max_lines=1, interactive=False, scale=3,
                                             elem_id="lora_trainer_result_path")
            self.tag_box = compat.make(gr.Textbox, value="", label="Prompt tag", lines=1, max_lines=1,
                                       interactive=False, scale=2, elem_id="lora_trainer_result_tag")
            self.copy_btn = compat.make(gr.Button, value="Copy tag", elem_id="lora_trainer_btn_copy_tag",
                                        scale=0, min_width=90)
        self.log_box = compat.make(gr.Textbox, value="", label="Training log", lines=10, max_lines=10,
                                   interactive=False, elem_id="lora_trainer_log")
        with gr.Accordion("Auto-label (CLIP)", open=False, elem_id="lora_trainer_label_group"):
            with gr.Row():
                self.label_model_path = compat.make(
                    gr.Textbox, label="CLIP model (local folder or .safetensors)", lines=1, max_lines=1,
                    scale=3, elem_id="lora_trainer_label_model_path")
                self.label_model_name = compat.make(
                    gr.Textbox, label="CLIP architecture (for a bare .safetensors)", lines=1, max_lines=1,
                    scale=2, elem_id="lora_trainer_label_model_name")
            self.label_overwrite = compat.make(gr.Checkbox, value=False, label="Replace existing captions",
                                               elem_id="lora_trainer_label_overwrite")
            self.label_btn = compat.make(gr.Button, value="Auto-label the dataset",
                                         elem_id="lora_trainer_btn_auto_label")
        with gr.Accordion("Runs", open=True, elem_id="lora_trainer_runs_group"):
            with gr.Row():
                self.runs_folder = compat.make(
                    gr.Textbox, label="Runs folder", lines=1, max_lines=1, scale=4,
                    value=str(self._default_runs_folder()), elem_id="lora_trainer_runs_folder")
                self.refresh_btn = compat.make(gr.Button, value="Refresh runs", scale=1,
                                               elem_id="lora_trainer_btn_refresh_runs")
            self.runs_table = compat.make(gr.Dataframe, value=self._runs_frame([]), headers=runs.COLUMNS,
                                          interactive=False, label="Runs found", wrap=True,
                                          elem_id="lora_trainer_runs_table")
            with gr.Row():
                self.runs_choice = compat.make(gr.Dropdown, choices=[], value=None, label="Run to resume",
                                               scale=4, elem_id="lora_trainer_runs_choice")
                self.resume_btn = compat.make(gr.Button, value="Resume run", scale=1,
                                              elem_id="lora_trainer_btn_resume")

    def _default_runs_folder(self) -> Path:
        if self.settings.runs_folder:
            return Path(self.settings.runs_folder)
        run_dir = self.defaults.get("run_dir")
        if run_dir:
            return Path(resolve_path(str(run_dir), self.settings.base_dir)).parent
        return Path(self.settings.base_dir) / "runs"

    # ---- events -------------------------------------------------------------------------------
    def _wire(self, gr, blocks) -> None:
        inputs = self.form.inputs
        quiet = {"show_progress": "hidden"}
        self.start_btn.click(self.on_start, [*inputs, self.force_resume], [self.message], **quiet)
        self.stop_btn.click(self.on_stop, None, [self.message], **quiet)
        self.save_now_btn.click(self.on_save_now, None, [self.message], **quiet)
        self.preview_now_btn.click(self.on_preview_now, None, [self.message], **quiet)
        self.check_btn.click(self.on_check_data, inputs, [self.message])
        self.label_btn.click(self.on_auto_label,
                             [self.label_model_path, self.label_model_name, self.label_overwrite, *inputs],
                             [self.message])
        self.load_btn.click(self.on_load_preset, [self.preset_path], [*inputs, self.message], **quiet)
        self.save_btn.click(self.on_save_preset, [self.preset_path, *inputs], [self.message], **quiet)
        self.refresh_btn.click(self.on_refresh_runs, [self.runs_folder, self.runs_choice],
                               [self.runs_table, self.runs_choice], **quiet)
        self.resume_btn.click(self.on_resume, [self.runs_choice, self.runs_folder],
                              [*inputs, self.message], **quiet)
        self.copy_btn.click(None, [self.tag_box], None, **compat.js_kwargs(COPY_JS))
        poll_outputs = [self.progress, self.plot, self.gallery, self.log_box, self.lora_path_box,
                        self.tag_box, self.runs_table, self.runs_choice, self.message]
        compat.poll(blocks, POLL_SECONDS, self.poll_step, [self.runs_folder, self.runs_choice], poll_outputs)
        self._wire_json_api(gr)
        if self.settings.mode == "standalone":
            js = read_asset(JS_FILE)
            if js:
                compat.on_load(blocks, None, js="() => {\n" + js + "\n}")

    def _wire_json_api(self, gr) -> None:
        """WebUI mode: a hidden button with api_name="lora_trainer_train_json", inputs (task id,
        config JSON), outputs (result JSON, HTML); scripts train through POST /run/<api_name>."""
        factory = self.settings.json_handler_factory
        if factory is None:
            return
        try:
            handler = factory()      # needs the WebUI's modules.call_queue
        except ImportError as error:
            log.info("No JSON training API (not inside the WebUI: %s)", error)
            return
        with compat.make(gr.Row, visible=False, elem_id="lora_trainer_api_row"):
            task = compat.make(gr.Textbox, visible=False, elem_id="lora_trainer_api_task")
            config = compat.make(gr.Textbox, visible=False, elem_id="lora_trainer_api_config")
            result = compat.make(gr.Textbox, visible=False, elem_id="lora_trainer_api_result")
            status = compat.make(gr.HTML, visible=False, elem_id="lora_trainer_api_status")
            button = compat.make(gr.Button, visible=False, elem_id="lora_trainer_btn_api_train")
        button.click(fn=handler, inputs=[task, config], outputs=[result, status],
                     api_name="lora_trainer_train_json")

    # ---- helpers ------------------------------------------------------------------------------
    def _config(self, values):
        """(config, None) or (None, message HTML)."""
        try:
            return self.form.to_config(values, self.settings.base_dir, self.settings.config_builder), None
        except ConfigError as error:
            return None, views.problems_html(error)
        except Exception as error:  # noqa: BLE001 - e.g. the WebUI's builder; stack to the log
            log.error("The form could not be turned into a config: %s", error, exc_info=True)
            return None, views.message_html(f"{type(error).__name__}: {error}", "error")

    def _runs_frame(self, found):
        import pandas as pd

        return pd.DataFrame(runs.table(found), columns=runs.COLUMNS)

    def _runs_roots(self, folder: str) -> list:
        roots = []
        if folder and folder.strip():
            roots.append(resolve_path(folder.strip(), self.settings.base_dir))
        current = self.worker.snapshot().run_dir
        if current:
            roots.append(str(Path(current).parent))
        return roots

    def _runs_found(self, folder: str):
        """(table, resumable runs newest first, as `_run_label`s)."""
        try:
            found = runs.find_runs(self._runs_roots(folder))
        except OSError as error:
            log.warning("Cannot list runs: %s", error)
            found = []
        return self._runs_frame(found), [self._run_label(r.path, folder) for r in found if r.resumable]

    def _run_label(self, run_dir, folder: str) -> str:
        """What the Run to resume list shows: the run's name when it is in the runs folder (the
        full path, e.g. <WebUI>/extensions/<extension>/runs/<name>, is too long to tell runs
        apart in the box), its full path otherwise."""
        roots = self._runs_roots(folder)
        if roots and Path(run_dir).resolve().parent == Path(roots[0]).resolve():
            return Path(run_dir).name
        return str(run_dir)

    def _run_dir_of(self, choice: str, folder: str) -> str:
        """The run folder a `_run_label` stands for."""
        if not choice or Path(choice).is_absolute():
            return choice
        for root in self._runs_roots(folder):
            if (Path(root) / choice).is_dir():
                return str(Path(root) / choice)
        return choice

    def _runs_outputs(self, folder: str, selected: Optional[str]):
        table, choices = self._runs_found(folder)
        value = selected if selected in choices else (choices[0] if choices else None)
        return table, compat.update(choices=choices, value=value)

    def _snapshot_outputs(self, snap: Snapshot):
        lora_path, tag = views.result_values(snap)
        return (views.progress_html(snap), views.loss_frame(snap), views.gallery_items(snap.previews),
                views.log_text(snap), lora_path, tag)

    # ---- handlers -----------------------------------------------------------------------------
    def on_start(self, *values):
        """Inputs: the form's values, then the force-resume checkbox."""
        *values, force_resume = values
        cfg, problem = self._config(values)
        if problem:
            return problem
        started, text = self.worker.start(cfg, force_resume=bool(force_resume))
        return views.message_html(text, "info" if started else "warn")

    def on_stop(self):
        if self.worker.stop():
            return views.message_html("Stopping after the current step; a checkpoint is saved so the "
                                      "run can be resumed from the Runs list.", "info")
        return views.message_html("No training run is active.", "warn")

    def on_save_now(self):
        if self.worker.save_now():
            return views.message_html("A checkpoint (and the LoRA file) will be saved after the current "
                                      "step.", "info")
        return views.message_html("No training run is active.", "warn")

    def on_preview_now(self):
        snap = self.worker.snapshot()
        if not snap.active:
            return views.message_html("No training run is active.", "warn")
        if not snap.has_previews:
            return views.message_html("This run has no preview prompts (Previews group), so there is "
                                      "nothing to render.", "warn")
        self.worker.preview_now()
        return views.message_html("Previews will be rendered after the current step.", "info")

    def on_check_data(self, *values):
        try:
            full_check = importlib.import_module("lora_trainer.datatools.full_check")
            checks = importlib.import_module("lora_trainer.datatools.checks")
        except ImportError:
            return views.message_html("Data tools not installed (lora_trainer.datatools is missing).", "warn")
        raw = self.form.to_dict(values)
        data_only = {k: raw[k] for k in DATA_KEYS if k in raw}
        try:
            cfg = config_from_dict(data_only, base_dir=self.settings.base_dir, source="the form",
                                   required=("train_data_dir",))
            result = full_check.check_dataset(
                cfg.train_data_dir, checks.CheckOptions(resolution=cfg.resolution),
                metadata_path=cfg.metadata_path, caption_extension=cfg.caption_extension,
                default_repeats=cfg.repeats)
        except ConfigError as error:
            return views.problems_html(error)
        except Exception as error:  # noqa: BLE001 - e.g. DataError: nothing to check
            log.warning("Data check failed: %s", error, exc_info=True)
            return views.message_html(f"Data check failed: {error}", "error")
        return views.findings_html(result)

    def on_auto_label(self, model_path, model_name, overwrite, *values):
        """Caption the dataset folder into metadata.csv with a local CLIP model (never a download);
        the trigger word comes from the form."""
        try:
            label = importlib.import_module("lora_trainer.datatools.label")
        except ImportError as error:
            return views.message_html(f"Auto-label needs open_clip ({error}).", "warn")
        raw = self.form.to_dict(values)
        try:
            cfg = config_from_dict({k: raw[k] for k in ("train_data_dir", "trigger_word") if k in raw},
                                   base_dir=self.settings.base_dir, source="the form",
                                   required=("train_data_dir",))
            options = label.LabelOptions(trigger=cfg.trigger_word, overwrite=bool(overwrite), progress=False)
            result = label.auto_label(cfg.train_data_dir, options, (model_path or "").strip() or None,
                                      (model_name or "").strip() or None)
        except ConfigError as error:
            return views.problems_html(error)
        except Exception as error:  # noqa: BLE001 - ModelNotFound says how to provide a model
            log.warning("Auto-label failed: %s", error, exc_info=True)
            return views.message_html(f"Auto-label failed: {error}", "error")
        kept = f"; kept {len(result.kept)} existing caption(s)" if result.kept else ""
        return views.message_html(f"Labeled {len(result.labeled)} image(s){kept}. Written: "
                                  + (", ".join(result.written) or "nothing"), "info")

    def _preset_file(self, path: str) -> Optional[Path]:
        if not path or not path.strip():
            return None
        return Path(resolve_path(path.strip(), self.settings.base_dir))

    def on_load_preset(self, path):
        unchanged = [compat.no_change()] * len(self.form.inputs)
        target = self._preset_file(path)
        if target is None:
            return [*unchanged, views.message_html("Give the path of a preset YAML file.", "warn")]
        if not target.is_file():
            return [*unchanged, views.message_html(f"No such file: {target}", "error")]
        try:
            cfg = load_config(target)
        except ConfigError as error:
            raw = _read_raw_yaml(target)
            if raw is None:
                return [*unchanged, views.problems_html(error)]
            values = fields.raw_to_values(_absolute_paths(raw, target.parent), self.form.names)
            return [*values, views.problems_html(error, f"Loaded {target}, but it has problems:")]
        values = fields.config_to_values(cfg, self.form.names)
        return [*values, views.message_html(f"Loaded preset {target}", "ok")]

    def on_save_preset(self, path, *values):
        target = self._preset_file(path)
        if target is None:
            return views.message_html("Give a file path for the preset (e.g. presets/my_lora.yaml).", "warn")
        cfg, problem = self._config(values)
        if problem:
            return problem
        try:
            from ..storage.atomic import atomic_write_text

            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, dump_config(cfg))
        except OSError as error:
            return views.message_html(f"Cannot write {target}: {error}", "error")
        return views.message_html(f"Saved preset {target}", "ok")

    def on_refresh_runs(self, folder, selected):
        return self._runs_outputs(folder, selected)

    def on_resume(self, choice, folder):
        unchanged = [compat.no_change()] * len(self.form.inputs)
        run_dir = self._run_dir_of(choice, folder)
        if not run_dir:
            return [*unchanged, views.message_html("Pick a run in the runs list first (Refresh runs).",
                                                   "warn")]
        try:
            cfg = runs.resume_config(run_dir, required=self.settings.required)
        except ConfigError as error:
            return [*unchanged, views.problems_html(error, f"Cannot resume {run_dir}:")]
        started, text = self.worker.start(cfg)
        if not started:
            return [*unchanged, views.message_html(text, "warn")]
        values = fields.config_to_values(cfg, self.form.names)
        return [*values, views.message_html(f"Resuming {run_dir}. " + text, "info")]

    def poll_step(self, state, folder, selected):
        """One refresh of the live view for one page: (new state, outputs). `state` is what this
        page already shows (None at first); unchanged parts are sent as no_change(). On gradio 3
        `folder`/`selected` are the values at page load (see compat.poll)."""
        state = dict(state or {})
        snap = self.worker.snapshot()
        keep = compat.no_change()
        outputs = [keep] * 9
        if snap.version == state.get("version"):
            if snap.active:     # nothing new, but the elapsed time and ETA move on (e.g. while starting)
                outputs[0] = views.progress_html(snap)
            return state, outputs
        first = "version" not in state
        progress, plot, gallery, log_text, lora_path, tag = self._snapshot_outputs(snap)
        outputs[:6] = [progress, plot, keep, log_text, lora_path, tag]
        if first or snap.previews != state.get("previews"):
            outputs[2] = gallery
        ended = snap.status in ("finished", "stopped", "error")
        just_ended = ended and not first and state.get("status") != snap.status
        if first or snap.runs_version != state.get("runs_version"):
            table, choices = self._runs_found(folder)
            ended_run = self._run_label(snap.run_dir, folder) if snap.run_dir else None
            if just_ended and ended_run in choices:        # offer the run that just ended
                choice = compat.update(choices=choices, value=ended_run)
            elif first and selected not in choices:
                choice = compat.update(choices=choices, value=choices[0] if choices else None)
            else:                                          # keep what the user picked
                choice = compat.update(choices=choices)
            outputs[6:8] = [table, choice]
        if just_ended:
            kind = {"finished": "ok", "stopped": "info", "error": "error"}[snap.status]
            outputs[8] = views.message_html(snap.message or snap.error, kind)
        state.update(version=snap.version, runs_version=snap.runs_version, status=snap.status,
                     previews=list(snap.previews))
        return state, outputs


def _read_raw_yaml(path: Path) -> Optional[dict]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _absolute_paths(raw: dict, folder: Path) -> dict:
    """Relative paths of a preset are relative to its folder (as load_config reads them)."""
    specs = field_specs()
    out = dict(raw)
    for key, value in raw.items():
        spec = specs.get(key)
        if spec and spec.meta.get("path") and isinstance(value, str) and value.strip():
            out[key] = resolve_path(value.strip(), folder)
    return out


__all__ = ["TabSettings", "build_tab"]
