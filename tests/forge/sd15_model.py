"""A random-weight checkpoint with the real SD1.5 architecture (the packaged SD1.5 configs, LDM key
layout, fp16: about 2 GB), written with the project's own builders. Forge (and anything that builds
its model from the real configs) loads it; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

from lora_trainer.backbones import tiny


def write_random_sd15(path: Path, seed: int = 0) -> Path:
    configs = tiny.load_config_dicts(tiny.SD1_CONFIG_DIR)
    models = tiny.build_models_from_configs(configs, seed=seed)
    for model in models.values():
        model.half()   # what an fp16 release holds; halves the file and the memory to write it
    return tiny.write_single_file(path, dict(models, configs=configs, family="sd1"))


if __name__ == "__main__":   # python tests/forge/sd15_model.py <file>
    import sys

    print(write_random_sd15(Path(sys.argv[1])))
