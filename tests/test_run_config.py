"""A config without `resolution` trains at its model's native size (SDXL 1024), read from the model
file's header by the composition root (app/run_config.py), not by config/: every host that loads a
config for a run lands the default — the CLI, check-data, the standalone tab (form, presets, the
--config it starts with) and the WebUI tab (the loaded checkpoint as base_model)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import yaml

from lora_trainer.app import check_data
from lora_trainer.app.run_config import load_run_config, native_resolution
from lora_trainer.config import ConfigError, load_config




def _config_without_resolution(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(folder / "lora"), "output_name": "xl", **values}))
    return path


@pytest.fixture
def xl_config(sdxl_file, shapes_dataset, tmp_path):
    return _config_without_resolution(tmp_path / "xl", base_model=str(sdxl_file),
                                      train_data_dir=str(shapes_dataset))


def test_config_alone_reads_no_model_file_the_run_config_does(xl_config, sdxl_file):
    assert load_config(xl_config).resolution == 512          # the schema default: config/ knows no model
    assert load_run_config(xl_config).resolution == 1024     # SDXL never trains at 512 by accident
    assert load_run_config(xl_config, {"resolution": 512}).resolution == 512   # a given value wins
    assert native_resolution(str(sdxl_file), None) == 1024


def test_a_model_that_cannot_be_read_keeps_the_default_and_the_error_names_the_field(
        tmp_path, shapes_dataset):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    path = _config_without_resolution(tmp_path / "c", base_model=str(broken), train_data_dir=str(shapes_dataset))
    assert load_run_config(path).resolution == 512   # the model load reports the file, not the config
    missing = _config_without_resolution(tmp_path / "m", base_model=str(tmp_path / "nope.safetensors"),
                                         train_data_dir=str(shapes_dataset))
    with pytest.raises(ConfigError) as error:
        load_run_config(missing)
    assert dict(error.value.problems)["base_model"].startswith("path does not exist")


def test_the_cli_and_check_data_land_the_default(xl_config, monkeypatch):
    from lora_trainer import cli

    seen = []
    monkeypatch.setattr(cli, "run_with_signals",
                        lambda cfg, quiet, force=False: seen.append(cfg) or types.SimpleNamespace(status="finished"))
    assert cli.main(["train", "--config", str(xl_config), "--quiet"]) == 0
    assert [cfg.resolution for cfg in seen] == [1024]
    assert check_data._training_config(str(xl_config)).resolution == 1024


def test_the_standalone_tab_lands_the_default(xl_config, sdxl_file, shapes_dataset, tmp_path):
    from lora_trainer.ui import presets
    from lora_trainer.ui.app import _initial_values
    from lora_trainer.ui.fields import Form

    assert _initial_values(str(xl_config))["resolution"] == 1024   # `lora-trainer ui --config`
    assert presets.load_preset(xl_config).resolution == 1024
    assert presets.load_preset(xl_config, required=("train_data_dir",)).resolution == 1024   # a WebUI preset
    form = Form({"train_data_dir": None, "base_model": None, "output_dir": None})
    values = [str(shapes_dataset), str(sdxl_file), str(tmp_path / "out")]
    assert form.to_config(values, tmp_path).resolution == 1024


def test_the_webui_tab_lands_the_default_of_the_loaded_checkpoint(sdxl_file, shapes_dataset, tmp_path):
    from lora_trainer.webui import job
    from lora_trainer.webui.env import WebuiEnv

    lora = tmp_path / "models" / "Lora"
    lora.mkdir(parents=True)
    model = types.SimpleNamespace(sd_checkpoint_info=types.SimpleNamespace(filename=str(sdxl_file)))
    env = WebuiEnv(sd_model=model, cmd_opts=types.SimpleNamespace(lora_dir=str(lora)),
                   opts=types.SimpleNamespace(), models_path=str(tmp_path / "models"), data_path=str(tmp_path))
    cfg = job.build_webui_config({"train_data_dir": str(shapes_dataset), "output_name": "xl"}, env)
    assert cfg.base_model == str(sdxl_file) and cfg.resolution == 1024
