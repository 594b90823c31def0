"""Where things go inside the WebUI, and the tab's WebUI settings.

- Finished LoRAs: the setting `lora_trainer_output_dir`, by default the WebUI's Lora folder
  (`--lora-dir`, default `models/Lora`), so a new LoRA shows up on the Lora cards.
- Run state (checkpoints, logs, previews): `<extension folder>/runs/<output_name>`. Never under the
  Lora folder: the WebUI lists every .safetensors below it as a LoRA (sub-folders included).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..storage.containment import is_inside

# lora_trainer/webui/paths.py -> the folder that holds lora_trainer/ (the extension's folder when
# installed in the WebUI's extensions/, whatever it is called)
EXTENSION_DIR = Path(__file__).resolve().parents[2]
SETTINGS_SECTION = ("lora_trainer", "LoRA Trainer")


def extension_dir() -> Path:
    return EXTENSION_DIR


def runs_dir() -> Path:
    return EXTENSION_DIR / "runs"


def run_dir_for(output_name: str) -> Path:
    return runs_dir() / output_name


def lora_dir(env) -> Path:
    """The WebUI's Lora folder (`--lora-dir`, added by the built-in Lora extension's preload)."""
    configured = env.cmd_option("lora_dir") if env is not None else None
    if configured:
        return Path(configured)
    models = (env.models_path if env is not None else None) or "models"
    return Path(models) / "Lora"


def lycoris_dir(env) -> Path | None:
    configured = env.cmd_option("lyco_dir_backcompat") if env is not None else None
    return Path(configured) if configured else None


def output_dir(env) -> Path:
    configured = env.option("lora_trainer_output_dir", "") if env is not None else ""
    return Path(configured) if str(configured).strip() else lora_dir(env)


def check_run_dir(run_dir, env) -> None:
    """Refuse a run folder the WebUI would scan for LoRAs (it would list checkpoints as LoRAs)."""
    for folder in (lora_dir(env), lycoris_dir(env)):
        if folder is not None and is_inside(run_dir, folder):
            raise ValueError(f"run_dir {run_dir} is inside the WebUI's LoRA folder {folder}: the WebUI "
                             f"would list the run's checkpoints as LoRAs. Leave run_dir empty (runs go "
                             f"to {runs_dir()}) or pick a folder outside {folder}.")


# ---- settings (Settings > LoRA Trainer) ----------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    key: str            # shared.opts key
    field: str | None   # the TrainConfig field it is the default for (None: not a config field)
    label: str
    default: object = None   # None: the TrainConfig default


SETTINGS = (
    Setting("lora_trainer_output_dir", None, "Folder for trained LoRAs (empty: the WebUI's Lora folder)", ""),
    Setting("lora_trainer_preview_every_n_steps", "preview_every_n_steps",
            "Default: render previews every N steps (0: off)"),
    Setting("lora_trainer_preview_steps", "preview_steps", "Default: sampling steps per preview"),
    Setting("lora_trainer_preview_cfg_scale", "preview_cfg_scale", "Default: preview CFG scale"),
    Setting("lora_trainer_preview_sampler", "preview_sampler", "Default: preview sampler"),
    Setting("lora_trainer_preview_seed", "preview_seed", "Default: preview seed"),
    Setting("lora_trainer_preview_negative_prompt", "preview_negative_prompt",
            "Default: preview negative prompt"),
)


def setting_default(setting: Setting):
    if setting.field is None:
        return setting.default
    from ..config import field_specs

    return field_specs()[setting.field].default if setting.default is None else setting.default


def webui_defaults(env) -> dict:
    """TrainConfig values the WebUI supplies: output and LoRA folders, the preview settings. What
    `build_tab(mode="webui", defaults=...)` starts from and what a job's config is completed with."""
    out = {"output_dir": str(output_dir(env)), "lora_dir": str(lora_dir(env))}
    for setting in SETTINGS:
        if setting.field is not None:
            out[setting.field] = env.option(setting.key, setting_default(setting)) if env is not None \
                else setting_default(setting)
    return out
