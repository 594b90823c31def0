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
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..config import REQUIRED_KEYS
from . import compat, fields, runs, views
from ..config.request_rules import RequestRules, names_only
from .tab_handlers import _TabHandlers
from .tab_runs import _RunsList
from .worker import TrainingWorker, default_worker

log = logging.getLogger("lora_trainer")

POLL_SECONDS = 1.0
REPO_ROOT = Path(__file__).resolve().parents[2]
CSS_FILE = REPO_ROOT / "style.css"
JS_FILE = REPO_ROOT / "javascript" / "lora_trainer.js"

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
    # raw form dict -> TrainConfig (raises ConfigError); default: app.run_config.run_config_from_dict
    config_builder: Optional[Callable[[dict], Any]] = None
    # (task id, config JSON) -> (result JSON, HTML) for the hidden API button (WebUI mode)
    json_handler_factory: Optional[Callable[[], Callable]] = None
    # where a request may read and write (docs/security.md); a callable: the WebUI's flags are
    # read when a request comes, not when the tab is built
    rules: Callable[[], RequestRules] = names_only
    presets_folder: Optional[Path] = None     # default: <base_dir>/presets
    # the folders the Runs list may show and resume from (None: any folder typed in the box)
    runs_roots: Optional[tuple] = None

    def presets_dir(self) -> Path:
        return Path(self.presets_folder or Path(self.base_dir) / "presets")


def _webui_settings(base_dir: Optional[Path]) -> tuple[TabSettings, Optional[Callable]]:
    """In the WebUI, training runs on the loaded model (base_model is optional) while holding the
    WebUI's GPU lock, with the config completed by the WebUI's defaults (lora_trainer.webui).
    Returns (settings, trainer); the trainer is None when lora_trainer.webui cannot be imported."""
    try:
        from ..webui import guard, job, paths
    except ImportError:
        folder = Path(base_dir or Path.cwd())
        return TabSettings(mode="webui", base_dir=folder, required=("train_data_dir",),
                           runs_folder=folder / "runs", runs_roots=(folder / "runs",)), None

    def current_env():
        from ..webui.env import WebuiEnv
        try:
            return WebuiEnv.current(with_model=False)
        except RuntimeError:      # not inside a WebUI (tests): its default folders
            return None

    def build_config(raw: dict):
        return job.build_webui_config(raw, current_env())

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
                           json_handler_factory=job.make_json_train_handler,
                           rules=lambda: guard.webui_rules(current_env()),
                           presets_folder=folder / "presets", runs_roots=(folder / "runs",))
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


class _TabBuilder(_TabHandlers, _RunsList):
    """Lays the tab out and wires its events; the handlers and the runs-list helpers are mixins
    (tab_handlers.py, tab_runs.py)."""

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
                    gr.Textbox, label=f"Preset name (a YAML file in {self.settings.presets_dir()})",
                    elem_id="lora_trainer_preset_path", placeholder="my_lora", lines=1, max_lines=1, scale=4)
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


__all__ = ["TabSettings", "build_tab"]
