"""User mistakes in the config and the dataset give one clear error that names the file, line or
field (issue: duplicated YAML keys kept the last silently, an unterminated quote in metadata.csv
swallowed rows, huge images printed raw library warnings, 200 asked steps trained 40)."""
from __future__ import annotations

import warnings

import pytest
from PIL import Image

from support import write_config

from lora_trainer.config import ConfigError, load_config
from lora_trainer.data.dataset_index import DataError
from lora_trainer.data.discovery import discover
from lora_trainer.data.images import UnreadableImage, load_rgb, probe_size
from lora_trainer.training.plan import TrainingPlan, iterate_steps


def test_a_duplicated_yaml_key_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("train_data_dir: ./data\nepochs: 10\nlora_rank: 8\nepochs: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "'epochs'" in str(error.value) and "line 2" in str(error.value) and "line 4" in str(error.value)


@pytest.mark.parametrize("run_dir, output_dir", [("out", "out"), ("out/runs/x", "out"),
                                                 ("run", "run/checkpoints")])
def test_output_dir_and_run_dir_may_not_overlap(tmp_path, make_config, run_dir, output_dir):
    path = make_config(run_dir=str(tmp_path / run_dir), output_dir=str(tmp_path / output_dir))
    with pytest.raises(ConfigError, match="run_dir"):
        load_config(path)


def csv_dataset(folder, text):
    for name in "abcd":
        Image.new("RGB", (16, 16), "red").save(folder / f"{name}.png")
    (folder / "metadata.csv").write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("text, line, says", [
    # a quote left open to the end of the file
    ('file_name,text\na.png,ok\nb.png,"red circle\nc.png,blue square\n', 3, "double quote"),
    # a quote that closes rows later: the rows between would have become one caption
    ('file_name,text\na.png,"red circle\nb.png,blue square\nc.png,green"\nd.png,x\n', 2, "closing double quote"),
    # an unquoted comma in a caption
    ('file_name,text\na.png,ok\n\nb.png,red, blue\n', 4, "3 cells"),
])
def test_a_malformed_metadata_csv_row_names_the_file_and_line(tmp_path, text, line, says):
    with pytest.raises(DataError) as error:
        discover(csv_dataset(tmp_path, text))
    message = str(error.value)
    assert "metadata.csv" in message and f"line {line}" in message and says in message, message


def test_multi_line_quoted_captions_are_still_fine(tmp_path):
    index = discover(csv_dataset(tmp_path, 'file_name,text\na.png,"two\nlines"\nb.png,"x, y"\n'))
    captions = {r.rel_path: r.caption for r in index.records}
    assert captions["a.png"] == "two, lines" and captions["b.png"] == "x, y"


def test_a_too_large_image_is_one_clear_line_without_pillow_warnings(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(big)                    # 6 megapixels, a few KB on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # any warning would fail the test
        with pytest.raises(UnreadableImage) as error:
            probe_size(big, max_pixels=5_000_000)
        with pytest.raises(UnreadableImage):
            load_rgb(big, max_pixels=2_000_000)               # Pillow's own error range too
        assert probe_size(big, max_pixels=6_000_000) == (3000, 2000)
    reason = error.value.reason
    assert "3000 x 2000" in reason and "limit is 5 megapixels" in reason and "max_image_megapixels" in reason


def test_the_config_limit_reaches_discovery(tmp_path, make_config, shapes_dataset):
    Image.new("L", (1200, 1000)).save(tmp_path / "huge.png")
    with pytest.raises(DataError, match="huge.png: image too large"):
        discover(tmp_path, max_pixels=1_000_000)
    cfg = load_config(make_config(max_image_megapixels=1.5))
    assert cfg.max_image_megapixels == 1.5


@pytest.mark.parametrize("epochs, max_steps, expected", [(10, 200, 200), (10, 7, 7), (2, None, 8)])
def test_max_train_steps_sets_the_length_whichever_way_it_differs_from_epochs(epochs, max_steps, expected):
    # 16 samples, batch 4: 4 steps per epoch, so 10 epochs are 40 steps
    plan = TrainingPlan(16, 4, 1, epochs, max_steps, batches_per_epoch=4)
    assert plan.total_steps == expected
    slices = list(iterate_steps(plan, [1] * 16, seed=0, start_epoch=0, start_batch=0))
    assert len(slices) >= expected and plan.epochs_to_run == -(-expected // 4)
    assert ("max_train_steps sets the length" in plan.describe_length()) == bool(max_steps)


def test_a_run_trains_the_asked_max_train_steps_beyond_its_epochs(make_config):
    from lora_trainer.app.session import train_from_config

    # 6 images x 2 repeats, batch 2: 6 steps per epoch; 1 epoch would stop at 6
    result = train_from_config(load_config(make_config(epochs=1, max_train_steps=8, write_card=False)))
    assert (result.status, result.step) == ("finished", 8)
    log = (result.run_dir / "logs" / "train.log").read_text()
    assert "max_train_steps sets the length" in log


def test_a_base_model_that_is_not_a_model_names_the_file_and_what_was_expected(tmp_path):
    from lora_trainer.backbones.diffusers_sd import ModelLoadError, load_backbone

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\xff" * 64)                                # "header too large"
    with pytest.raises(ModelLoadError) as error:
        load_backbone(str(fake))
    message = str(error.value)
    assert str(fake) in message and "is not a model" in message and "diffusers model folder" in message
