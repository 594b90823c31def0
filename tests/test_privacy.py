"""A LoRA file and its card files are shared publicly: nothing in them may name the machine's
folders or its user (issue: absolute paths in every LoRA's metadata)."""
from __future__ import annotations

import json
import re
import shutil

from PIL import Image

from support import write_config

from lora_trainer.config import load_config
from lora_trainer.config.public import path_name, shareable_config
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.tools.demo import write_dataset
from lora_trainer.app.session import train_from_config

FAKE_USER = "jdoe_secret_user"
# a POSIX absolute path (not the "//" of a URL) or a Windows drive path
ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'(\[=,;])/(?!/)[^\s\"']+|\b[A-Za-z]:[\\/]")


def leaks(text: str, home) -> list[str]:
    found = [needle for needle in (str(home), FAKE_USER) if needle in text]
    return found + ABSOLUTE_PATH.findall(text)


def test_path_name_cuts_posix_and_windows_paths_to_their_last_name():
    assert path_name("/home/jdoe/data/style/") == "style"
    assert path_name("C:\\Users\\jdoe\\models\\v1-5.safetensors") == "v1-5.safetensors"
    assert path_name("") == ""


def test_a_trained_lora_and_its_cards_hold_no_local_path_or_user_name(tmp_path, tiny_sd1):
    home = tmp_path / "home" / FAKE_USER / "projects" / "loras"
    models = home / "models"
    models.mkdir(parents=True)
    shutil.copy(tiny_sd1["single_file"], models / "tiny-sd1.safetensors")
    shutil.copytree(tiny_sd1["config_folder"], models / "tiny-sd1.config")
    data = write_dataset(home / "datasets" / "shapes", count=4, size=64)
    Image.new("RGB", (64, 64), "white").save(data / "2_shapes" / "extra.png")
    (data / "metadata.csv").write_text("file_name,text\n2_shapes/extra.png,lt_demo plain\n")
    config = write_config(home, train_data_dir=data, base_model=models / "tiny-sd1.safetensors",
                          metadata_path=data / "metadata.csv", cache_dir=home / "cache",
                          lora_dir=home / "lora", epochs=1, preview_steps=2, trigger_word="lt_demo")
    (home / "lora").mkdir()

    cfg = load_config(config)
    result = train_from_config(cfg)

    _, meta = read_lora_file(result.lora_path)
    for key, value in meta.items():
        assert not leaks(value, home), (key, value)
    embedded = json.loads(meta["lora_trainer_config"])
    assert embedded["train_data_dir"] == "shapes" and embedded["base_model"] == "tiny-sd1.safetensors"
    assert "output_dir" not in embedded and "run_dir" not in embedded and "cache_dir" not in embedded
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_shapes": {"n_repeats": 2, "img_count": 5}}
    card = result.lora_path.with_suffix(".json")
    assert card.is_file() and not leaks(card.read_text(), home)
    thumbnail = result.lora_path.with_suffix(".preview.png")
    with Image.open(thumbnail) as image:
        assert not any(leaks(str(text), home) for text in image.info.values())
    # the run folder keeps the full local config
    assert str(data) in (result.run_dir / "config.yaml").read_text()


def test_the_shareable_config_keeps_every_setting_that_is_not_a_location(make_config):
    cfg = load_config(make_config(epochs=3, learning_rate=5e-4))
    public = shareable_config(cfg)
    assert public["epochs"] == 3 and public["learning_rate"] == 5e-4
    assert set(public) == set(vars(cfg)) - {"output_dir", "run_dir", "cache_dir"}
