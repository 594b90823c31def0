"""The WebUI's entry point into the lora_trainer extension (AUTOMATIC1111 v1.10 and Forge: docs/forge.md).

The WebUI imports every `scripts/*.py` of an installed extension (extensions/<any folder name>/)
with that folder briefly at the front of `sys.path`. This file registers exactly two callbacks and
changes nothing else in the WebUI:

- `on_ui_tabs`: the "Train LoRA" tab, built by `lora_trainer.ui.tab.build_tab(mode="webui",
  defaults=...)` (a placeholder that says why, if the tab cannot be built);
- `on_ui_settings`: Settings > LoRA Trainer (output folder, preview defaults).

Training itself runs on the model the WebUI has loaded (lora_trainer.webui).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parent.parent
TAB_TITLE = "Train LoRA"
TAB_ID = "lora_trainer"

log = logging.getLogger("lora_trainer")


def _import_package():
    """Import the `lora_trainer` package that sits in this extension's folder, whatever the folder
    is called (the WebUI has put that folder on sys.path while it loads this file)."""
    try:
        import lora_trainer
    except ImportError:
        sys.path.insert(0, str(EXTENSION_DIR))
        try:
            import lora_trainer
        finally:
            sys.path.remove(str(EXTENSION_DIR))
    where = Path(lora_trainer.__file__).resolve().parent.parent
    if where != EXTENSION_DIR:
        log.warning("lora_trainer: using the package from %s, not the one in this extension (%s)",
                    where, EXTENSION_DIR)
    return lora_trainer


_import_package()


def placeholder_message(error: BaseException) -> str:
    missing = getattr(error, "name", None)
    if isinstance(error, ImportError) and missing in ("lora_trainer.ui.tab", "lora_trainer.ui"):
        return ("The Train LoRA tab is not part of this version of the extension yet "
                f"(lora_trainer.ui.tab.build_tab is missing in {EXTENSION_DIR}).")
    return f"The Train LoRA tab could not be built: {type(error).__name__}: {error}"


def build_train_tab(gr, env_factory=None):
    """(blocks, title, elem_id) for the WebUI; a placeholder tab with the reason if building fails."""
    try:
        from lora_trainer.ui.tab import build_tab
        from lora_trainer.webui.env import WebuiEnv
        from lora_trainer.webui.paths import webui_defaults

        env = env_factory() if env_factory else WebuiEnv.current(with_model=False)
        blocks = build_tab(mode="webui", defaults=webui_defaults(env))
    except Exception as e:   # the rest of the WebUI must come up whatever happens here
        message = placeholder_message(e)
        log.error("lora_trainer: %s", message, exc_info=not isinstance(e, ImportError))
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(f"**{TAB_TITLE} is not available.** {message}")
    return blocks, TAB_TITLE, TAB_ID


def setting_options(gr, shared, env):
    """(key, OptionInfo) for Settings > LoRA Trainer, from the config schema's defaults and ranges."""
    from lora_trainer.config import field_specs
    from lora_trainer.webui.paths import SETTINGS, SETTINGS_SECTION, lora_dir, setting_default

    specs = field_specs()
    options = []
    for setting in SETTINGS:
        label = setting.label
        if setting.field is None:
            label = f"{label}: {lora_dir(env)}"
            component, args = gr.Textbox, {}
        else:
            spec = specs[setting.field]
            if spec.meta.get("choices"):
                component, args = gr.Dropdown, {"choices": list(spec.meta["choices"])}
            elif spec.kind in ("int", "float"):
                component, args = gr.Number, {"precision": 0} if spec.kind == "int" else {}
            else:
                component, args = gr.Textbox, {}
        info = shared.OptionInfo(setting_default(setting), label, component, args, section=SETTINGS_SECTION)
        options.append((setting.key, info))
    return options


def on_ui_tabs():
    import gradio as gr

    return [build_train_tab(gr)]


def on_ui_settings():
    import gradio as gr
    from modules import shared

    from lora_trainer.webui.env import WebuiEnv

    for key, info in setting_options(gr, shared, WebuiEnv.current(with_model=False)):
        shared.opts.add_option(key, info)


try:
    from modules import script_callbacks
except ImportError:   # imported outside the WebUI (tests, tools): register nothing
    script_callbacks = None

if script_callbacks is not None:
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
