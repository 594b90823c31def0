"""Dataset tools: check-data finds planted problems (and nothing on a clean set), the training gate
refuses on errors, and `label` writes captions that discovery reads back."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lora_trainer.cli import main as cli_main
from lora_trainer.config import load_config
from lora_trainer.data.discovery import DataError, discover
from lora_trainer.datatools.checks import CheckOptions, caption_tokens, quick_check
from lora_trainer.datatools.full_check import check_dataset

RESOLUTION = 256
CLEAN_COUNT = 8


# ---- synthetic data --------------------------------------------------------------------------------

def synthetic_image(seed: int, width: int = 320, height: int = 320) -> Image.Image:
    """Shapes + text on a noise texture: sharp by any blur metric and distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=3)
    pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        box = (x0, y0, x0 + int(rng.integers(30, 150)), y0 + int(rng.integers(30, 150)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    draw.text((10, 10), f"sample {seed}", fill=(255, 255, 255), font=ImageFont.load_default(size=28))
    return image


def write_clean_set(folder: Path, count: int = CLEAN_COUNT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        size = (320, 320) if i % 2 else (384, 288)   # two buckets, nothing below the resolution
        synthetic_image(i, *size).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"zzt, shapes, sample {i}, noise texture\n")
    return folder


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = write_clean_set(tmp_path_factory.mktemp("planted") / "data")
    (root / "truncated.jpg").write_bytes(jpeg_bytes(synthetic_image(100))[:4000])
    (root / "truncated.txt").write_text("zzt, broken")
    synthetic_image(101).resize((16, 16)).save(root / "tiny.png")
    (root / "tiny.txt").write_text("zzt, tiny")
    near = synthetic_image(0, 384, 288).resize((300, 225), Image.Resampling.LANCZOS)
    (root / "near_copy.jpg").write_bytes(jpeg_bytes(near, quality=70))
    (root / "near_copy.txt").write_text("zzt, a resized copy")
    synthetic_image(1).filter(ImageFilter.GaussianBlur(4)).save(root / "blurred.png")
    (root / "blurred.txt").write_text("zzt, a blurred copy")
    synthetic_image(102).save(root / "empty_caption.png")
    (root / "empty_caption.txt").write_text("")
    synthetic_image(103).save(root / "long_caption.png")
    (root / "long_caption.txt").write_text(", ".join(f"tag{i} red" for i in range(40)))  # ~200 tokens
    shutil.copy(root / "img_03.png", root / "exact_copy.png")
    (root / "exact_copy.txt").write_text("zzt, the same file again")
    synthetic_image(104).save(root / "animation.gif")
    (root / "not_an_image.png").write_bytes(b"<html>a saved web page</html>")   # no image header
    (root / "0_unused").mkdir()
    synthetic_image(105).save(root / "0_unused" / "excluded.png")               # 0 repeats: not a problem
    return root


def codes(findings, severity=None):
    return {(f.code, tuple(f.files)) for f in findings if severity is None or f.severity == severity}


def files_with(findings, code):
    return [set(f.files) for f in findings if f.code == code]


# ---- check-data ------------------------------------------------------------------------------------

def test_clean_set_has_no_errors_or_warnings(tmp_path):
    result = check_dataset(write_clean_set(tmp_path / "clean"), CheckOptions(resolution=RESOLUTION))
    problems = [f for f in result.findings if f.severity != "info"]
    assert problems == []
    assert min(i.sharpness for i in result.images) > 10 * CheckOptions().blur_threshold
    assert result.summary["epoch_size"] == CLEAN_COUNT
    # the report's buckets are the ones training uses (data.buckets), per image
    from lora_trainer.data.buckets import bucket_for
    for image in result.images:
        assert image.bucket == bucket_for(image.width, image.height, RESOLUTION)
    assert sum(b["images"] for b in result.summary["buckets"]) == CLEAN_COUNT


def test_report_buckets_are_the_trainers_buckets():
    from lora_trainer.data.buckets import bucket_for, default_buckets

    buckets = default_buckets(512)
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets) and (512, 512) in buckets
    assert bucket_for(384, 288, 512) == (576, 448)
    assert bucket_for(288, 384, 512) == (448, 576)
    assert bucket_for(5000, 100, 512) == (1024, 256)
    assert default_buckets(64) == ((64, 64),)


def test_planted_problems_are_found_with_their_severity(planted):
    result = check_dataset(planted, CheckOptions(resolution=RESOLUTION))
    by_code = {}
    for f in result.findings:
        by_code.setdefault(f.code, []).append(f)
    assert ("unreadable", ("truncated.jpg",)) in codes(result.findings, "error")
    assert ("unreadable", ("not_an_image.png",)) in codes(result.findings, "error")
    assert ("tiny_image", ("tiny.png",)) in codes(result.findings, "error")
    assert {"img_00.png", "near_copy.jpg"} in files_with(result.findings, "near_duplicate")
    assert ("blurry", ("blurred.png",)) in codes(result.findings, "warning")
    assert ("empty_caption", ("empty_caption.png",)) in codes(result.findings, "warning")
    assert ("long_caption", ("long_caption.png",)) in codes(result.findings, "warning")
    assert {"img_03.png", "exact_copy.png"} in files_with(result.findings, "exact_duplicate")
    assert ("unsupported_format", ("animation.gif",)) in codes(result.findings, "warning")
    assert {f.severity for f in by_code["near_duplicate"] + by_code["blurry"]} == {"warning"}
    # Only the two planted errors are errors; the originals of the copies are otherwise fine.
    errors = {f.files[0] for f in result.findings if f.severity == "error"}
    assert errors == {"truncated.jpg", "not_an_image.png", "tiny.png"}
    assert not any("excluded.png" in f.files for f in result.findings)
    assert not any(f.code == "blurry" and f.files[0].startswith("img_") for f in result.findings)


def test_caption_tokens_use_the_real_clip_tokenizer():
    counts, tails = caption_tokens(["a cat", ", ".join(f"tag{i} red" for i in range(40))])
    assert counts[0] == 2 and tails[0] == ""
    assert counts[1] == 10 * 3 + 30 * 4 + 39        # "tag", digits, "red" each; one per comma
    # tags 0-16 fill 74 tokens, tag17 crosses 75: the message quotes the caption from there on
    assert tails[1].startswith("tag17 red, tag18 red") and tails[1].endswith("tag39 red")


def test_cli_writes_json_and_html_and_strict_exit_code(planted, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["check-data", str(planted), "--resolution", str(RESOLUTION), "--out", str(out)]
    assert cli_main(args) == 0                       # a report, not a gate
    assert cli_main(args + ["--strict"]) == 1        # errors fail with --strict
    table = capsys.readouterr().out
    assert "tiny_image" in table and "truncated.jpg" in table
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["error"] == 3
    assert {i["rel_path"] for i in report["images"]} >= {"img_00.png", "tiny.png"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") >= CLEAN_COUNT and "near_duplicate" in html


def test_strict_passes_on_warnings_only(tmp_path):
    data = write_clean_set(tmp_path / "data", count=3)
    (data / "img_00.txt").write_text("")             # a warning, not an error
    args = ["check-data", str(data), "--resolution", str(RESOLUTION), "--out", str(tmp_path / "r")]
    assert cli_main(args + ["--strict"]) == 0


# ---- the training gate -----------------------------------------------------------------------------

@pytest.fixture
def tiny_image_config(tmp_path):
    data = write_clean_set(tmp_path / "data", count=2)
    synthetic_image(7).resize((16, 16)).save(data / "tiny.png")
    (data / "tiny.txt").write_text("zzt, tiny")
    base_model = tmp_path / "model.safetensors"
    base_model.write_bytes(b"never loaded: the tests stop before the model load")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train_data_dir": str(data), "base_model": str(base_model),
                                      "resolution": 64, "output_dir": str(tmp_path / "out")}))
    return config


class ReachedModelLoad(Exception):
    pass


def test_training_refuses_on_errors_and_check_data_false_skips(tiny_image_config, monkeypatch):
    from lora_trainer.backbones import diffusers_sd
    from lora_trainer.app.session import train_from_config

    def fake_load_backbone(*args, **kwargs):
        raise ReachedModelLoad()

    monkeypatch.setattr(diffusers_sd, "load_backbone", fake_load_backbone)
    with pytest.raises(DataError) as refused:
        train_from_config(load_config(tiny_image_config))
    assert "tiny.png" in str(refused.value) and "check_data: false" in str(refused.value)
    with pytest.raises(ReachedModelLoad):           # the check is skipped, training goes on
        train_from_config(load_config(tiny_image_config, {"check_data": False}))


def test_check_data_reads_a_training_config(tiny_image_config, tmp_path):
    # The config's resolution (64) makes the 16x16 image an error.
    assert cli_main(["check-data", str(tiny_image_config), "--strict", "--out", str(tmp_path / "r")]) == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["options"]["resolution"] == 64


def test_run_training_checks_an_index_it_is_given(tiny_image_config):
    from lora_trainer.app.session import index_dataset, run_training

    cfg = load_config(tiny_image_config)
    with pytest.raises(DataError, match="tiny.png"):
        run_training(cfg, backbone=None, index=index_dataset(cfg))


def test_quick_check_warns_without_decoding(tmp_path):
    data = write_clean_set(tmp_path / "data", count=2)
    (data / "img_01.txt").unlink()
    found = quick_check(discover(data), SimpleNamespace(resolution=512))
    assert ("missing_caption", ("img_01.png",)) in codes(found, "warning")
    assert ("small_image", ("img_00.png",)) in codes(found, "warning")   # 384x288 < 512
    assert codes(found, "error") == set()


# ---- labeling --------------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict:
    """A random-weight open_clip model: as config JSON + weights, and as open_clip's HF folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    config = root / "tiny-datatools-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(config.stem)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, root / "weights.safetensors")
    folder = root / "hf_layout"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    save_file(tensors, folder / "open_clip_model.safetensors")
    return {"config": config, "weights": root / "weights.safetensors", "folder": folder}


@pytest.fixture
def one_torch_thread():
    # The tiny model's matmuls are far too small to split; on a busy 2-core machine OpenMP threads
    # spinning against each other made them ~30x slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_unlabeled_set(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        synthetic_image(200 + i).resize((96, 96)).save(folder / f"{name}.png")
    (folder / "b.txt").write_text("sidecar caption")
    with open(folder / "metadata.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["file_name", "text"], ["a.png", 'csv caption, "quoted"']])
    return folder


def test_label_writes_metadata_csv_that_training_reads(tiny_clip, one_torch_thread, tmp_path, capsys):
    data = write_unlabeled_set(tmp_path / "data")
    extra = tmp_path / "mood.txt"
    extra.write_text("# my own category\ncalm\nangry, loud\n")
    assert cli_main(["label", str(data), "--model-path", str(tiny_clip["weights"]),
                     "--model", str(tiny_clip["config"]), "--trigger", "zzt", "--top-k", "1",
                     "--threshold", "0", "--batch-size", "2", "--vocab", str(extra), "--quiet"]) == 0
    assert "kept 2 existing" in capsys.readouterr().out
    with open(data / "metadata.csv", newline="") as handle:
        rows = {row["file_name"]: row["text"] for row in csv.DictReader(handle)}
    assert rows["a.png"] == 'csv caption, "quoted"'            # kept, and still one CSV field
    assert "b.png" not in rows                                  # its sidecar caption stays in charge
    new = {name: rows[name] for name in ("c.png", "d.png", "e.png")}
    for caption in new.values():
        tags = caption.split(", ")
        assert tags[0] == "zzt" and len(tags) >= 1 + 7           # one tag per shipped category at least
    captions = {r.rel_path: r.caption for r in discover(data).records}
    assert captions == {"a.png": 'csv caption, "quoted"', "b.png": "sidecar caption", **new}


def test_label_from_open_clip_folder_writes_txt_and_overwrites_only_when_asked(tiny_clip, one_torch_thread,
                                                                             tmp_path):
    data = write_unlabeled_set(tmp_path / "data")
    base = ["label", str(data), "--model-path", str(tiny_clip["folder"]), "--trigger", "zzt",
            "--threshold", "0", "--write", "txt", "--quiet"]
    assert cli_main(base) == 0
    assert (data / "b.txt").read_text() == "sidecar caption"
    assert (data / "c.txt").read_text().startswith("zzt, ")
    assert cli_main(base + ["--overwrite"]) == 0
    assert (data / "b.txt").read_text().startswith("zzt, ")


def test_label_refuses_pickles_and_says_how_to_provide_a_model(tmp_path, capsys):
    pickle = tmp_path / "open_clip_pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04")
    data = write_clean_set(tmp_path / "data", count=1)
    assert cli_main(["label", str(data), "--model-path", str(pickle), "--model", "ViT-B-32"]) == 2
    assert cli_main(["label", str(data), "--model-path", str(tmp_path)]) == 2
    assert cli_main(["label", str(data), "--model", "ViT-B-32", "--cache-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "open_clip_pytorch_model.bin" in err
    assert "open_clip_model.safetensors" in err and "--model-path" in err


def hub_cache_entry(cache: Path, repo_id: str, files: dict) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out (refs/main -> snapshots/<rev>/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("rev0")
    snapshot = repo / "snapshots" / "rev0"
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


def test_models_are_found_in_local_caches_only(tmp_path):
    from lora_trainer.datatools.clip_model import resolve_model

    cache = tmp_path / "hub"
    repo = hub_cache_entry(cache, "me/tiny-clip", {"open_clip_config.json": "{}",
                                                   "open_clip_model.safetensors": ""})
    found = resolve_model(model_name="hf-hub:me/tiny-clip", cache_dir=cache)
    assert found.architecture == f"local-dir:{repo}" and found.weights.name == "open_clip_model.safetensors"
    # open_clip's pretrained tags: ViT-B-32's first tag is OpenAI's, which needs QuickGELU
    hub_cache_entry(cache, "timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": ""})
    found = resolve_model(model_name="ViT-B-32", cache_dir=cache)
    assert found.architecture == "ViT-B-32" and found.quick_gelu and found.preprocess["mean"][0] < 0.5
    (cache / "ViT-L-14.safetensors").write_text("")
    assert resolve_model(model_name="ViT-L-14", cache_dir=cache).weights == cache / "ViT-L-14.safetensors"


def test_the_tab_auto_labels_with_the_forms_trigger_word(tiny_clip, one_torch_thread, tmp_path):
    pytest.importorskip("gradio")   # installed by .ci/bootstrap; the tab needs it
    from lora_trainer.config import config_from_dict
    from lora_trainer.ui import fields
    from lora_trainer.ui.tab import TabSettings, _TabBuilder
    from lora_trainer.ui.worker import TrainingWorker

    data = write_unlabeled_set(tmp_path / "data")
    builder = _TabBuilder(TabSettings(base_dir=tmp_path), TrainingWorker(trainer=lambda *a, **k: None), None)
    builder.build()
    cfg = config_from_dict({"train_data_dir": str(data), "trigger_word": "tabtrig"}, base_dir=tmp_path,
                           required=("train_data_dir",))
    message = builder.on_auto_label(str(tiny_clip["weights"]), str(tiny_clip["config"]), False,
                                    *fields.config_to_values(cfg))
    assert "Labeled 3 image(s)" in message and "kept 2" in message
    captions = {r.rel_path: r.caption for r in discover(data).records}
    assert all(captions[name].startswith("tabtrig, ") for name in ("c.png", "d.png", "e.png"))
    missing = builder.on_auto_label(str(tmp_path / "nothing-here"), "", False, *fields.config_to_values(cfg))
    assert "Auto-label failed" in missing
