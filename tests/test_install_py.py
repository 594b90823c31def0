"""install.py, the script the WebUI runs for the extension (launch_utils.run_extension_installer:
`python install.py` with PYTHONPATH=<webui root>, so `import launch` gives the WebUI's helpers).

Dry runs against a simulated AUTOMATIC1111 v1.10.1 environment: a fake `find_spec` answering for the
packages its requirements_versions.txt installs, and a fake `launch` module recording `run_pip`.
Nothing is installed by these tests.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

INSTALL_PY = Path(__file__).resolve().parent.parent / "install.py"

# Distribution names pinned by A1111 v1.10.1's requirements_versions.txt (torch is listed unpinned
# there and installed by TORCH_COMMAND), with the import names they provide.
A1111_PINNED = {
    "setuptools": "setuptools", "GitPython": "git", "Pillow": "PIL", "accelerate": "accelerate",
    "blendmodes": "blendmodes", "clean-fid": "cleanfid", "diskcache": "diskcache", "einops": "einops",
    "facexlib": "facexlib", "fastapi": "fastapi", "gradio": "gradio", "httpcore": "httpcore",
    "inflection": "inflection", "jsonmerge": "jsonmerge", "kornia": "kornia", "lark": "lark",
    "numpy": "numpy", "omegaconf": "omegaconf", "open-clip-torch": "open_clip", "piexif": "piexif",
    "protobuf": "google.protobuf", "psutil": "psutil", "pytorch_lightning": "pytorch_lightning",
    "resize-right": "resize_right", "safetensors": "safetensors", "scikit-image": "skimage",
    "spandrel": "spandrel", "spandrel-extra-arches": "spandrel_extra_arches", "tomesd": "tomesd",
    "torch": "torch", "torchdiffeq": "torchdiffeq", "torchsde": "torchsde",
    "transformers": "transformers", "httpx": "httpx", "pillow-avif-plugin": "pillow_avif",
}
# What those pull in as dependencies (omegaconf needs PyYAML; tqdm comes with many of them).
A1111_DEPENDENCIES = {"yaml", "tqdm", "requests", "starlette", "pydantic", "huggingface_hub"}
A1111_ENV = set(A1111_PINNED.values()) | A1111_DEPENDENCIES
NOT_IN_A1111 = {"diffusers", "peft", "bitsandbytes", "tensorboard"}


def fake_find_spec(available: set[str]):
    def find_spec(name, package=None):
        return types.SimpleNamespace(name=name) if name in available else None
    return find_spec


@pytest.fixture
def run_install(monkeypatch, capsys):
    """Run install.py's main() in-process against a simulated environment; returns (exit code,
    run_pip calls, printed text)."""
    def run(available: set[str], argv=(), with_launch=True):
        calls = []
        if with_launch:
            launch = types.ModuleType("launch")
            launch.run_pip = lambda command, desc=None, live=None: calls.append(command)
            launch.is_installed = lambda package: package in available
            monkeypatch.setitem(sys.modules, "launch", launch)
        else:
            monkeypatch.setitem(sys.modules, "launch", None)   # `import launch` fails
        # install.py binds importlib.util.find_spec as a default argument when it is loaded
        monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(available))
        spec = importlib.util.spec_from_file_location("lora_trainer_install_under_test", INSTALL_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.undo()   # the real find_spec back before anything else imports
        if with_launch:
            monkeypatch.setitem(sys.modules, "launch", launch)
        code = module.main(list(argv))
        return code, calls, capsys.readouterr().out
    return run


def test_nothing_is_installed_in_an_a1111_environment(run_install):
    code, calls, out = run_install(A1111_ENV, ["--dry-run"])
    assert code == 0 and "would install: nothing" in out and calls == []
    code, calls, out = run_install(A1111_ENV)
    assert code == 0 and calls == [] and out == ""


def test_only_what_is_missing_is_installed_unpinned(run_install):
    code, calls, _ = run_install(A1111_ENV - {"yaml"})
    assert code == 0 and calls == ["install pyyaml"]
    code, calls, out = run_install(A1111_ENV - {"yaml", "tqdm"}, ["--dry-run"])
    assert calls == [] and "would install: pyyaml, tqdm" in out


def test_pinned_packages_are_never_touched(run_install):
    pinned_names = {n.lower() for n in A1111_PINNED}
    # every combination of our own requirements missing, with all of the WebUI's pins present
    for missing in ({"yaml"}, {"tqdm"}, {"yaml", "tqdm"}, set()):
        code, calls, _ = run_install(A1111_ENV - missing)
        assert code == 0
        for command in calls:
            words = command.split()
            assert words[0] == "install"
            assert not any(w.startswith("-") for w in words[1:]), command     # no --upgrade etc.
            assert not any(c in command for c in "=<>~"), command              # no version specs
            assert not {w.lower() for w in words[1:]} & pinned_names, command


def test_diffusers_is_never_required(run_install):
    module_names = A1111_ENV - NOT_IN_A1111
    code, calls, out = run_install(module_names, ["--dry-run"])
    assert "nothing" in out
    spec = importlib.util.spec_from_file_location("install_requirements", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wanted = {*module.REQUIREMENTS, *module.REQUIREMENTS.values()}
    assert not wanted & (NOT_IN_A1111 | {"transformers", "accelerate", "torch", "gradio"})


def test_without_the_webui_it_names_the_pip_command(run_install):
    code, calls, out = run_install(A1111_ENV - {"tqdm"}, with_launch=False)
    assert code == 1 and calls == [] and "pip install tqdm" in out


def test_the_webui_side_of_the_package_imports_without_diffusers(tmp_path):
    """Inside the WebUI there is no diffusers: the modules a WebUI job uses must not need it."""
    blocker = tmp_path / "sitecustomize.py"
    # None in sys.modules: `import diffusers` fails, importlib.util.find_spec says None (not installed)
    blocker.write_text("import sys\nsys.modules['diffusers'] = None\nsys.modules['peft'] = None\n")
    code = ("import lora_trainer.webui.job, lora_trainer.webui.backbone, lora_trainer.webui.lora_state, "
            "lora_trainer.webui.progress, lora_trainer.webui.paths, lora_trainer.webui.names, "
            "lora_trainer.app.session, lora_trainer.backbones.diffusers_sd as d; "
            "import sys; assert sys.modules.get('diffusers') is None; print('ok')")
    env = {"PYTHONPATH": f"{tmp_path}:{INSTALL_PY.parent}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_run_the_way_the_webui_runs_it(tmp_path):
    """`python install.py` with PYTHONPATH=<webui root> (a fake launch.py there), once with a
    package hidden so that something must be installed."""
    webui = tmp_path / "webui"
    webui.mkdir()
    log = tmp_path / "pip.log"
    (webui / "launch.py").write_text(textwrap.dedent(f"""
        def run_pip(command, desc=None, live=False):
            with open({str(log)!r}, "a") as f:
                f.write(command + "\\n")
        def is_installed(package):
            return True
    """))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tqdm'] = None\n")

    def run(extra_path=""):
        env = {"PYTHONPATH": f"{webui}{':' + extra_path if extra_path else ''}", "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, str(INSTALL_PY)], capture_output=True, text=True,
                              env=env, cwd=webui, timeout=120)

    out = run()
    assert out.returncode == 0, out.stderr
    assert not log.exists()
    out = run(str(hide))
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == ["install tqdm"]
