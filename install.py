"""Run by the WebUI (A1111 / Forge) when the extension is installed or the WebUI starts.

Installs only what is missing and never upgrades or pins anything the WebUI itself pins (torch,
gradio, transformers, safetensors, numpy, pillow, ...). diffusers is not needed inside the WebUI:
there the loaded model is trained directly. With everything present it does nothing at all.
Run `python install.py --dry-run` to see what it would do.
"""
import importlib.util
import sys

# import name -> pip requirement; only packages the WebUI does not already ship.
REQUIREMENTS = {
    "yaml": "pyyaml",
    "tqdm": "tqdm",
}


def missing_requirements(find_spec=importlib.util.find_spec):
    return [req for module, req in REQUIREMENTS.items() if find_spec(module) is None]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    missing = missing_requirements()
    if "--dry-run" in argv:
        print("lora_trainer install.py would install: " + (", ".join(missing) or "nothing"))
        return 0
    if not missing:
        return 0
    try:
        import launch  # the WebUI's helper: respects --skip-install and its pip settings
    except ImportError:
        print("lora_trainer: missing " + ", ".join(missing) + "; run: pip install " + " ".join(missing))
        return 1
    for req in missing:
        launch.run_pip(f"install {req}", f"lora_trainer requirement: {req}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
