"""What a request inside the WebUI may make the extension read and write (docs/security.md).

Every caller of the tab — its buttons, the gradio function routes (`/run/predict` by fn_index) and
`POST /run/lora_trainer_train_json` — reaches the same handlers, so the rules are applied there:

- writes: the LoRA only under the WebUI's Lora folder (or the folder set in Settings > LoRA
  Trainer), run state only under `<extension>/runs`, the latent cache only under
  `<extension>/cache`; `output_name` is a name;
- reads, when the WebUI is reachable from other machines (`--listen`, `--share`, `--ngrok`,
  `--server-name`) and not started with `--enable-insecure-extension-access` (A1111's own switch
  for "remote users may make this server touch files"): only inside the WebUI's data folders.
"""
from __future__ import annotations

from pathlib import Path

from ..config.request_rules import RequestRules, folders
from .paths import extension_dir, lora_dir, output_dir, runs_dir

INSECURE_FLAG = "--enable-insecure-extension-access"
REMOTE_FLAGS = ("listen", "share", "ngrok", "server_name")


def cache_root() -> Path:
    return extension_dir() / "cache"


def presets_root() -> Path:
    return extension_dir() / "presets"


def is_remote(env) -> bool:
    """True when people on other machines can reach the WebUI and it did not opt in to letting
    extensions touch files for them. A1111 computes this itself (`disable_extension_access`);
    it is recomputed from the flags where that attribute is missing (other forks, stand-ins)."""
    if env is None or env.cmd_opts is None:
        return False
    computed = getattr(env.cmd_opts, "disable_extension_access", None)
    if computed is not None:
        return bool(computed)
    remote = any(env.cmd_option(flag) for flag in REMOTE_FLAGS)
    return remote and not env.cmd_option("enable_insecure_extension_access", False)


def data_roots(env) -> list[Path]:
    """The WebUI's own data folders: what a remote user may make the extension read."""
    roots = [getattr(env, "data_path", None), getattr(env, "models_path", None), lora_dir(env),
             output_dir(env), extension_dir()]
    return folders(roots)


def webui_rules(env) -> RequestRules:
    writes = {"output_dir": folders([lora_dir(env), output_dir(env)]),
              "run_dir": [runs_dir()],
              "cache_dir": [cache_root()]}
    write_hint = ("Inside the WebUI, LoRAs go to its Lora folder (sub-folders allowed), run state to the "
                  "extension's runs folder and the cache to its cache folder; leave the field empty for "
                  "the default")
    if not is_remote(env):
        return RequestRules(write_roots=writes, write_hint=write_hint)
    read_hint = (f"The WebUI is reachable from other machines (--listen/--share/--server-name), so requests "
                 f"may only read inside its data folders; move the files there, or restart the WebUI with "
                 f"{INSECURE_FLAG} if everyone who can reach it may read this machine's files")
    return RequestRules(write_roots=writes, read_roots=data_roots(env), write_hint=write_hint,
                        read_hint=read_hint)


__all__ = ["INSECURE_FLAG", "cache_root", "data_roots", "is_remote", "presets_root", "webui_rules"]
