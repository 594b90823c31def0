"""The event handlers of the "Train LoRA" tab: Start / Stop / Save now / Preview now, the data
check and auto-label buttons, presets, Resume, and the poll that refreshes the live view. A mixin of
`tab._TabBuilder` (which lays the tab out and wires these to its components); each handler returns
what gradio shows, so they can be called directly in tests.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, config_from_dict, dump_config, resolve_path
from ..config.load import field_specs
from ..storage.containment import PathRefused
from . import compat, fields, presets, runs, views
from .tab_runs import _RunsList
from .worker import Snapshot

log = logging.getLogger("lora_trainer")

DATA_KEYS = ("train_data_dir", "metadata_path", "caption_extension", "repeats", "resolution")


class _TabHandlers(_RunsList):
    """Handlers; they use the builder's `settings`, `worker`, `form` and the `_RunsList` helpers."""

    form: fields.Form   # set by tab._TabBuilder.build (declared here for the type checker)

    # ---- helpers ------------------------------------------------------------------------------
    def _rules(self):
        return self.settings.rules()

    def _checked_raw(self, values, keys=None) -> dict:
        """The form's raw values (only `keys` if given), refused (ConfigError) where this mode's
        request rules say so, before anything is read."""
        raw = self.form.to_dict(values)
        if keys is not None:
            raw = {k: raw[k] for k in keys if k in raw}
        self._rules().check_values(raw, self.settings.base_dir, "the form")
        return raw

    def _config(self, values):
        """(config, None) or (None, message HTML)."""
        try:
            self._checked_raw(values)
            return self.form.to_config(values, self.settings.base_dir, self.settings.config_builder), None
        except ConfigError as error:
            return None, views.problems_html(error)
        except Exception as error:  # noqa: BLE001 - e.g. the WebUI's builder; stack to the log
            log.error("The form could not be turned into a config: %s", error, exc_info=True)
            return None, views.message_html(f"{type(error).__name__}: {error}", "error")

    def _snapshot_outputs(self, snap: Snapshot):
        lora_path, tag = views.result_values(snap)
        return (views.progress_html(snap), views.loss_frame(snap), views.gallery_items(snap.previews),
                views.log_text(snap), lora_path, tag)

    # ---- handlers -----------------------------------------------------------------------------
    def on_start(self, *values):
        """Inputs: the form's values, then the force-resume checkbox."""
        *form_values, force_resume = values
        cfg, problem = self._config(form_values)
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
        try:
            data_only = self._checked_raw(values, DATA_KEYS)
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
        model_path = (model_path or "").strip() or None
        try:
            raw = self._checked_raw(values, ("train_data_dir", "trigger_word"))
            if model_path:
                self._rules().check_read(resolve_path(model_path, self.settings.base_dir), "CLIP model")
            cfg = config_from_dict(raw, base_dir=self.settings.base_dir, source="the form",
                                   required=("train_data_dir",))
            options = label.LabelOptions(trigger=cfg.trigger_word, overwrite=bool(overwrite), progress=False)
            result = label.auto_label(cfg.train_data_dir, options, model_path,
                                      (model_name or "").strip() or None)
        except ConfigError as error:
            return views.problems_html(error)
        except PathRefused as error:
            return views.message_html(str(error), "error")
        except Exception as error:  # noqa: BLE001 - ModelNotFound says how to provide a model
            log.warning("Auto-label failed: %s", error, exc_info=True)
            return views.message_html(f"Auto-label failed: {error}", "error")
        kept = f"; kept {len(result.kept)} existing caption(s)" if result.kept else ""
        return views.message_html(f"Labeled {len(result.labeled)} image(s){kept}. Written: "
                                  + (", ".join(result.written) or "nothing"), "info")

    def _preset_file(self, name: str) -> Path:
        """The preset file a name stands for, inside the presets folder (PathRefused otherwise)."""
        return presets.preset_file(self.settings.presets_dir(), name)

    def on_load_preset(self, name):
        unchanged = [compat.no_change()] * len(self.form.inputs)
        if not (name or "").strip():
            return [*unchanged, views.message_html("Give the name of a preset.", "warn")]
        try:
            target = self._preset_file(name)
        except PathRefused as error:
            return [*unchanged, views.message_html(str(error), "error")]
        if not target.is_file():
            return [*unchanged, views.message_html(f"No preset named {target.name} in {target.parent}", "error")]
        try:
            cfg = presets.load_preset(target, self.settings.required)
        except ConfigError as error:
            raw = _read_raw_yaml(target)
            if raw is None:
                return [*unchanged, views.problems_html(error, f"Cannot load the preset {target}:")]
            values = fields.raw_to_values(_absolute_paths(raw, target.parent), self.form.names)
            return [*values, views.problems_html(error, f"Loaded {target}, but it has problems:")]
        values = fields.config_to_values(cfg, self.form.names)
        return [*values, views.message_html(f"Loaded preset {target}", "ok")]

    def on_save_preset(self, name, *values):
        if not (name or "").strip():
            return views.message_html("Give the preset a name (e.g. my_lora).", "warn")
        try:
            target = self._preset_file(name)
        except PathRefused as error:
            return views.message_html(str(error), "error")
        cfg, problem = self._config(values)
        if problem:
            return problem
        try:
            from ..storage.atomic import atomic_write_text

            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, dump_config(cfg))
        except OSError as error:
            return views.message_html(f"Cannot write {target}: {error.strerror or error}", "error")
        return views.message_html(f"Saved preset {target}", "ok")

    def on_refresh_runs(self, folder, selected):
        return self._runs_outputs(folder, selected)

    def on_resume(self, choice, folder):
        unchanged = [compat.no_change()] * len(self.form.inputs)
        run_dir = self._run_dir_of(choice, folder)
        if not run_dir:
            return [*unchanged, views.message_html("Pick a run in the runs list first (Refresh runs).",
                                                   "warn")]
        if not self._allowed_runs_folder(run_dir):
            return [*unchanged, views.message_html(
                f"Runs can only be resumed from {self._runs_roots_text()}.", "error")]
        try:
            cfg = runs.resume_config(run_dir, required=self.settings.required)
            self._rules().check_config(cfg, f"the run {Path(run_dir).name}")
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
