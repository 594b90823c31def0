"""Path rules for request-reachable fields (docs/security.md): the containment helper, and every
path-bearing field of a WebUI request (`job.build_webui_config`, what both the tab's Start and
`POST /run/lora_trainer_train_json` go through) attacked with `../`, absolute paths, a symlink that
escapes its folder and Windows-style `..\\`. No gradio, no model: the refusals come before either."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from lora_trainer.config import ConfigError
from lora_trainer.storage.containment import PathRefused, child, is_inside, name_problem, require_inside
from lora_trainer.webui import guard, job, paths
from lora_trainer.webui.env import WebuiEnv

SECRET = "root:x:0:0:do-not-echo-me"


# ---- the helper ---------------------------------------------------------------------------------

def test_is_inside_resolves_dot_dot_absolute_and_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    assert is_inside(root / "sub" / "new.safetensors", root)        # a file not written yet
    assert is_inside(root, root)
    assert not is_inside(root / "sub" / ".." / ".." / "outside", root)
    assert not is_inside(outside, root)
    assert not is_inside(root / "escape" / "x.safetensors", root)  # the symlink leads out
    assert not is_inside(str(root) + "_twin", root)                 # a prefix is not a parent
    with pytest.raises(PathRefused, match="output_dir.*outside the allowed folder"):
        require_inside(outside, [root], "output_dir")


@pytest.mark.parametrize("bad", ["../evil_up", "..\\evil_up", "a/b", "a\\b", "/abs/name", "C:evil",
                                 "..", ".", "", "  "])
def test_names_are_names(bad):
    assert name_problem(bad) is not None


def test_child_stays_in_its_folder(tmp_path):
    assert child(tmp_path, "my_lora", "name", ".yaml") == tmp_path / "my_lora.yaml"
    (tmp_path / "link.yaml").symlink_to(tmp_path.parent / "elsewhere.yaml")
    with pytest.raises(PathRefused):
        child(tmp_path, "link", "name", ".yaml")
    with pytest.raises(PathRefused):
        child(tmp_path, "../x", "name", ".yaml")


# ---- WebUI requests -----------------------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    """A WebUI layout: data folder with models/Lora and a dataset inside, and a folder outside it
    with a dataset and a secret file."""
    data = tmp_path / "webui"
    lora = data / "models" / "Lora"
    lora.mkdir(parents=True)
    inside = data / "train" / "set"
    inside.mkdir(parents=True)
    outside = tmp_path / "home"
    (outside / "set").mkdir(parents=True)
    (outside / "secret.csv").write_text(SECRET + "\n")
    (outside / "lora.safetensors").write_bytes(b"x")
    (lora / "escape").symlink_to(outside, target_is_directory=True)
    return types.SimpleNamespace(data=data, lora=lora, inside=inside, outside=outside)


def webui_env(site, **flags) -> WebuiEnv:
    opts = dict(lora_dir=str(site.lora), listen=False, share=False, ngrok=None, server_name=None,
                enable_insecure_extension_access=False)
    opts.update(flags)
    return WebuiEnv(cmd_opts=types.SimpleNamespace(**opts), opts=types.SimpleNamespace(),
                    models_path=str(site.data / "models"), data_path=str(site.data))


def refused(values, env, field, *, contains=None):
    with pytest.raises(ConfigError) as info:
        job.build_webui_config(values, env)
    keys = [key for key, _ in info.value.problems]
    assert field in keys, info.value
    text = str(info.value)
    assert SECRET not in text and "does not exist" not in text     # no echo, no probing
    if contains:
        assert contains in text
    return text


WRITE_ATTACKS = {
    "output_dir": ["{outside}", "{lora}/../../../home", "{lora}/escape", "{lora}/..\\..\\..\\home"],
    "run_dir": ["{outside}/run", "{runs}/../../escaped", "{lora}/run"],
    "cache_dir": ["{outside}/cache", "{ext}/cache/../../x"],
}


@pytest.mark.parametrize("field,template", [(f, t) for f, ts in WRITE_ATTACKS.items() for t in ts])
def test_webui_writes_stay_in_the_webui_folders(site, field, template):
    value = template.format(outside=site.outside, lora=site.lora, runs=paths.runs_dir(),
                            ext=paths.extension_dir())
    if "\\" in template:      # Windows separators are not separators here: a name inside Lora
        cfg = job.build_webui_config({"train_data_dir": str(site.inside), field: value}, webui_env(site))
        assert is_inside(getattr(cfg, field), site.lora)
        return
    refused({"train_data_dir": str(site.inside), field: value}, webui_env(site), field)


def test_webui_output_subfolders_and_defaults_are_allowed(site):
    env = webui_env(site)
    cfg = job.build_webui_config({"train_data_dir": str(site.inside), "output_dir": str(site.lora / "styles"),
                                  "output_name": "mine", "cache_dir": str(guard.cache_root())}, env)
    assert Path(cfg.output_dir) == site.lora / "styles" and Path(cfg.run_dir) == paths.runs_dir() / "mine"


@pytest.mark.parametrize("name", ["../evil_up", "..\\evil_up", "/abs/evil", "sub/evil", "C:\\evil"])
def test_webui_output_name_is_a_name(site, name):
    refused({"train_data_dir": str(site.inside), "output_name": name}, webui_env(site), "output_name")


READ_FIELDS = {"train_data_dir": "{outside}/set", "metadata_path": "{outside}/secret.csv",
               "init_lora_from": "{outside}/lora.safetensors", "base_model_config": "{outside}/set",
               "base_model": "{outside}/lora.safetensors", "lora_dir": "{outside}",
               }


@pytest.mark.parametrize("field", sorted(READ_FIELDS))
def test_webui_with_listen_reads_only_its_data_folders(site, field):
    value = READ_FIELDS[field].format(outside=site.outside)
    values = {"train_data_dir": str(site.inside), field: value}
    text = refused(values, webui_env(site, listen=True), field, contains=guard.INSECURE_FLAG)
    assert "--listen" in text
    # the traversal spelling of the same path, and a symlink from inside the data folder
    values[field] = str(site.data / ".." / Path(value).relative_to(site.outside.parent))
    refused(values, webui_env(site, listen=True), field)
    values[field] = str(site.lora / "escape" / Path(value).relative_to(site.outside))
    refused(values, webui_env(site, share=True), field)


def test_webui_insecure_flag_and_local_webui_allow_outside_reads(site):
    values = {"train_data_dir": str(site.outside / "set")}
    for env in (webui_env(site, listen=True, enable_insecure_extension_access=True), webui_env(site)):
        assert job.build_webui_config(values, env).train_data_dir == str(site.outside / "set")
    # A1111's own verdict wins where it exists (--server-name, --ngrok are remote too)
    env = webui_env(site, server_name="0.0.0.0")
    assert guard.is_remote(env)
    env.cmd_opts.disable_extension_access = False
    assert not guard.is_remote(env)


def test_webui_json_route_refuses_before_training(site, monkeypatch):
    """`train_from_json` (the JSON route's handler) never reaches the model with a refused path."""
    import json

    trained = []
    monkeypatch.setattr(job, "train_on_loaded_model", lambda cfg, **kw: trained.append(cfg))
    env = webui_env(site, listen=True)
    with pytest.raises(ConfigError) as info:
        job.train_from_json(json.dumps({"train_data_dir": str(site.inside), "output_name": "../evil_up",
                                        "output_dir": str(site.outside),
                                        "metadata_path": str(site.outside / "secret.csv")}), env)
    assert {k for k, _ in info.value.problems} == {"output_name", "output_dir", "metadata_path"}
    assert SECRET not in str(info.value) and trained == []


def test_a_metadata_path_at_any_file_is_not_echoed(shapes_dataset, tmp_path):
    """metadata_path pointing at a file that is not a metadata.csv (e.g. the system password file): the error
    names the file and the missing columns, never its first line."""
    from lora_trainer.data.discovery import DataError, discover

    other = tmp_path / "passwd"
    other.write_text(SECRET + "\nmore:lines\n")
    with pytest.raises(DataError) as info:
        discover(shapes_dataset, metadata_path=other)
    assert SECRET not in str(info.value) and "file_name" in str(info.value) and str(other) in str(info.value)
