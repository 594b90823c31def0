"""Config loading, validation, dumping, CLI flags and the generated reference docs."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from lora_trainer.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    cfg_warnings,
    config_diff,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
    overrides_from_args,
    render_config_reference,
    write_effective_config,
)
from lora_trainer.config.docs import REFERENCE_PATH

SEED_YAML = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"
lora_rank: 8
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out like the seed YAML expects (data, metadata.csv, a checkpoint file)."""
    (tmp_path / "data" / "style_train").mkdir(parents=True)
    (tmp_path / "data" / "style_train" / "metadata.csv").write_text("file_name,text\n")
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    (tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors").write_bytes(b"")
    return tmp_path


def write_yaml(folder: Path, text: str, name: str = "train.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def seed_with(project: Path, extra: str = "", drop: tuple = ()) -> Path:
    lines = [line for line in SEED_YAML.splitlines() if line.split(":")[0] not in drop]
    return write_yaml(project, "\n".join(lines) + "\n" + extra)


def problems_of(path: Path, overrides=None) -> dict:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return dict(info.value.problems)


# ---- the seed config ----------------------------------------------------------------------------

def test_seed_yaml_loads_with_numeric_string_learning_rate(project):
    cfg = load_config(seed_with(project))
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 0.0002
    assert (cfg.lora_rank, cfg.batch_size, cfg.epochs, cfg.save_steps) == (8, 4, 10, 100)
    assert cfg.train_data_dir == str(project / "data" / "style_train")
    assert cfg.metadata_path == str(project / "data" / "style_train" / "metadata.csv")
    assert cfg.output_dir == str(project / "output" / "my_style_lora")


def test_defaults_are_filled(project):
    cfg = load_config(seed_with(project))
    assert cfg.resolution == 512 and cfg.optimizer == "adamw" and cfg.seed == 42
    assert cfg.preview_prompts == [] and cfg.lora_alpha is None and cfg.resume is True
    assert cfg.run_dir == str(project / "runs" / "my_lora")


def test_run_dir_follows_output_name(project):
    cfg = load_config(seed_with(project, "output_name: anime\n"))
    assert cfg.run_dir == str(project / "runs" / "anime")


def test_relative_paths_resolve_against_yaml_folder_not_cwd(project, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load_config(seed_with(project))
    assert cfg.base_model == str(project / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors")


def test_home_is_expanded(project, monkeypatch):
    monkeypatch.setenv("HOME", str(project))
    cfg = load_config(seed_with(project, "init_lora_from: ~/data/style_train/metadata.csv\n"))
    assert cfg.init_lora_from == str(project / "data" / "style_train" / "metadata.csv")


# ---- one test per error class --------------------------------------------------------------------

def test_unknown_key_suggests_closest(project):
    path = seed_with(project, "learnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "learnig_rate: unknown key; did you mean 'learning_rate'?" in str(info.value)
    assert str(info.value).startswith(str(path))


def test_wrong_type_names_key_value_and_type(project):
    message = problems_of(seed_with(project, "resolution: big\n"))["resolution"]
    assert "'big'" in message and "int" in message


def test_non_integral_float_for_int_is_rejected(project):
    assert "2.5" in problems_of(seed_with(project, "resolution: 2.5\n"))["resolution"]


def test_bool_is_not_a_number(project):
    assert "float" in problems_of(seed_with(project, "weight_decay: true\n"))["weight_decay"]


def test_out_of_range_names_value_and_range(project):
    message = problems_of(seed_with(project, "lora_rank: 0", drop=("lora_rank",)))["lora_rank"]
    assert "0" in message and "1 to 1024" in message


def test_bad_choice_lists_allowed_values(project):
    message = problems_of(seed_with(project, "optimizer: adam\n"))["optimizer"]
    assert "'adam'" in message and "adamw, adamw8bit" in message


def test_missing_required_says_what_to_put(project):
    problems = problems_of(seed_with(project, drop=("base_model",)))
    assert "missing" in problems["base_model"] and ".safetensors" in problems["base_model"]


def test_missing_path_shows_resolved_path(project):
    problems = problems_of(seed_with(project, "base_model_config: ./configs/nope\n"))
    assert str(project / "configs" / "nope") in problems["base_model_config"]


def test_folder_given_where_file_expected(project):
    problems = problems_of(seed_with(project, "init_lora_from: ./data\n"))
    assert "folder" in problems["init_lora_from"]


def test_four_mistakes_are_reported_together(project):
    path = write_yaml(project, SEED_YAML.replace("lora_rank: 8", "lora_rank: 0")
                      + "learnig_rate: 1e-4\nepochs: many\nlr_scheduler: cosin\n")
    path.write_text(path.read_text().replace("epochs: 10\n", ""))
    problems = problems_of(path)
    assert set(problems) == {"lora_rank", "learnig_rate", "epochs", "lr_scheduler"}
    assert "did you mean 'cosine'" in problems["lr_scheduler"]


def test_invalid_yaml_and_missing_file(project):
    assert "YAML" in str(problems_of(write_yaml(project, "a: [unclosed\n")))
    with pytest.raises(ConfigError, match="not found"):
        load_config(project / "absent.yaml")


# ---- coercions users expect ---------------------------------------------------------------------

def test_user_friendly_coercions(project):
    cfg = load_config(seed_with(project, "resolution: 768.0\nmax_grad_norm:\nmixed_precision: no\n"
                                         "preview_prompts: a castle\ntrigger_word: ''\n"
                                         "save_precision: BF16\n"))
    assert cfg.resolution == 768 and isinstance(cfg.resolution, int)
    assert cfg.max_grad_norm is None and cfg.trigger_word is None
    assert cfg.mixed_precision == "no"          # unquoted `no` is False in YAML 1.1
    assert cfg.preview_prompts == ["a castle"]
    assert cfg.save_precision == "bf16"


def test_prompt_list_must_hold_strings(project):
    problems = problems_of(seed_with(project, "preview_prompts: [a cat, 3]\n"))
    assert "preview_prompts" in problems


def test_text_encoder_lr_without_text_encoder_warns(project):
    cfg = load_config(seed_with(project, "text_encoder_lr: 5e-5\n"))
    assert any("text_encoder_lr" in w for w in cfg_warnings(cfg))
    cfg = load_config(seed_with(project, "text_encoder_lr: 5e-5\ntrain_text_encoder: true\n"))
    assert cfg_warnings(cfg) == []


def test_keep_tokens_without_shuffle_is_fine(project):
    cfg = load_config(seed_with(project, "keep_tokens: 1\n"))
    assert cfg.keep_tokens == 1 and cfg_warnings(cfg) == []


def test_config_from_dict_for_the_ui(project):
    cfg = config_from_dict({"train_data_dir": "data/style_train", "epochs": 3.0}, project,
                           source="ui", required=("train_data_dir",))
    assert cfg.epochs == 3 and cfg.train_data_dir == str(project / "data" / "style_train")
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, project, source="ui")
    assert str(info.value).startswith("ui:")
    assert {k for k, _ in info.value.problems} == {"train_data_dir", "base_model"}


# ---- dump / effective config --------------------------------------------------------------------

def test_dump_then_load_round_trips(project, tmp_path_factory):
    cfg = load_config(seed_with(project, "preview_prompts: ['a: b', '<lora:x:0.7> --n ugly']\n"
                                         "trigger_word: 'yes'\noutput_name: '2024'\n"))
    other = tmp_path_factory.mktemp("other")
    assert load_config(write_yaml(other, dump_config(cfg))) == cfg


def test_dump_keeps_schema_order_with_group_headers(project):
    text = dump_config(load_config(seed_with(project)))
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert keys == [f.name for f in dataclasses.fields(TrainConfig)]
    assert "# ---- Training ----" in text


def test_write_effective_config(project):
    cfg = load_config(seed_with(project))
    written = write_effective_config(cfg)
    assert written == Path(cfg.run_dir) / "config.yaml"
    assert load_config(written) == cfg
    assert os.listdir(cfg.run_dir) == ["config.yaml"]     # no temp file left behind


def test_config_to_dict_is_a_copy(project):
    cfg = load_config(seed_with(project, "preview_prompts: [a]\n"))
    as_dict = config_to_dict(cfg)
    as_dict["preview_prompts"].append("b")
    assert cfg.preview_prompts == ["a"] and list(as_dict) == [f.name for f in
                                                              dataclasses.fields(TrainConfig)]


# ---- CLI ----------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-trainer train")
    parser.add_argument("--config")
    add_config_arguments(parser)
    return parser


def test_cli_overrides_win_over_yaml(project):
    args = make_parser().parse_args(["--config", "x.yaml", "--learning-rate", "1e-4", "--no-resume",
                                     "--preview-prompts", "a", "--preview-prompts", "b",
                                     "--max-grad-norm", "none"])
    overrides = overrides_from_args(args)
    assert overrides == {"learning_rate": 1e-4, "resume": False, "preview_prompts": ["a", "b"],
                         "max_grad_norm": None}
    cfg = load_config(seed_with(project), overrides)
    assert cfg.learning_rate == 1e-4 and cfg.epochs == 10 and cfg.max_grad_norm is None


def test_no_flags_means_no_overrides():
    assert overrides_from_args(make_parser().parse_args([])) == {}


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--optimizer", "sgd"])
    assert "adamw" in capsys.readouterr().err


def test_cli_paths_are_relative_to_cwd(project, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("cwd")
    (elsewhere / "imgs").mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(seed_with(project), {"train_data_dir": "imgs"})
    assert cfg.train_data_dir == str(elsewhere / "imgs")


def test_every_field_has_a_flag_in_help():
    help_text = make_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name


# ---- docs ---------------------------------------------------------------------------------------

def test_every_field_is_documented():
    docs = render_config_reference()
    for f in dataclasses.fields(TrainConfig):
        assert f"`{f.name}`" in docs, f.name


def test_reference_file_is_current():
    assert REFERENCE_PATH.read_text(encoding="utf-8") == render_config_reference(), \
        "docs/config-reference.md is stale: run python -m lora_trainer.config.docs"


# ---- resume comparison --------------------------------------------------------------------------

def test_config_diff_reports_resume_kinds(project):
    cfg = load_config(seed_with(project))
    saved = yaml.safe_load(dump_config(cfg))
    assert config_diff(saved, cfg) == []
    new = dataclasses.replace(cfg, lora_rank=16, epochs=20, save_steps=50)
    kinds = {c.key: (c.old, c.new, c.resume) for c in config_diff(saved, new)}
    assert kinds == {"lora_rank": (8, 16, "fixed"), "epochs": (10, 20, "force"),
                     "save_steps": (100, 50, "free")}


def test_config_diff_coerces_old_values_and_defaults_missing_keys(project):
    cfg = load_config(seed_with(project))
    saved = yaml.safe_load(dump_config(cfg))
    saved["learning_rate"] = "2e-4"          # as an old hand-written file would hold it
    del saved["noise_offset"]                # written before the key existed
    assert config_diff(saved, cfg) == []


def test_config_hash_ignores_free_fields(project):
    cfg = load_config(seed_with(project))
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, save_steps=5, output_name="z"))
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, lora_rank=4))
    assert len(config_hash(cfg)) == 64


def test_default_paths_resolve_against_the_yaml_folder_and_survive_the_effective_config(tmp_path):
    from lora_trainer.config import load_config, write_effective_config

    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    (tmp_path / "c.yaml").write_text(f"train_data_dir: data\nbase_model: {model.name}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.output_dir == str(tmp_path / "output")
    effective = write_effective_config(cfg)          # runs/my_lora/config.yaml
    assert load_config(effective).output_dir == str(tmp_path / "output")
