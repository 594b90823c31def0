"""Observability: train.log, TensorBoard and `lora-trainer doctor`, on the tiny SD1 model."""
from __future__ import annotations

import logging
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lora_trainer.backbones.diffusers_sd import DiffusersBackbone, load_backbone
from lora_trainer.cli import main as cli_main
from lora_trainer.config import load_config
from lora_trainer.app import doctor
from lora_trainer.monitor import system
from lora_trainer.training.control import TrainingObserver
from lora_trainer.app.session import run_training, train_from_config

REPO = Path(__file__).resolve().parents[1]


class SquarePreviewer:
    """Stands in for the real previewer: one PNG per call, coloured by the step."""

    def render(self, trainer, step):
        path = Path(trainer.run_dir) / "previews" / f"step-{step:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (step * 40 % 256, 80, 160)).save(path)
        return [path]


class LogReader(TrainingObserver):
    """Reads train.log while training runs: what a user tailing the file would see."""

    def __init__(self, log_path: Path):
        self.log_path, self.seen_at_step = log_path, {}

    def on_step(self, report):
        self.seen_at_step[report.step] = self.log_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, tiny_sd1, shapes_dataset):
    """One tiny run (4 steps, a progress line every 2, a checkpoint at 3, previews) shared by the
    train.log and TensorBoard tests."""
    folder = tmp_path_factory.mktemp("monitored")
    # written here, not with conftest's write_config: `from conftest import` can pick up another
    # folder's conftest.py when the whole suite runs
    values = dict(train_data_dir=str(shapes_dataset), base_model=str(tiny_sd1["single_file"]),
                  output_dir=str(folder / "lora"), output_name="test_lora", resolution=64, lora_rank=4,
                  batch_size=2, learning_rate=1e-3, save_precision="fp32", num_threads=2,
                  max_train_steps=4, log_every_n_steps=2, save_steps=3, preview_every_n_steps=3)
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    cfg = load_config(folder / "config.yaml")
    reader = LogReader(Path(cfg.run_dir) / "logs" / "train.log")
    result = run_training(cfg, load_backbone(str(tiny_sd1["single_file"])), observers=[reader],
                          previewer=SquarePreviewer())
    assert result.status == "finished"
    return cfg, reader, (Path(cfg.run_dir) / "logs" / "train.log").read_text(encoding="utf-8")


# ---- train.log ----------------------------------------------------------------------------------------
def test_train_log_has_config_environment_dataset_progress_and_events(monitored_run):
    cfg, reader, text = monitored_run
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line)    # timestamps
               for line in text.splitlines() if re.search(r"(INFO|WARNING|ERROR) +lora_trainer[.\w]*: ", line))
    assert "effective config:" in text and "lora_rank: 4" in text and "log_every_n_steps: 2" in text
    env = re.search(r"environment: (.*)", text).group(1)
    for field in (f"torch={torch.__version__}", "python=", "diffusers=", "transformers=", "device=cpu",
                  "dtype=float32", f"torch_threads={torch.get_num_threads()}"):
        assert field in env, field
    assert "dataset: 6 images, 12 samples per epoch" in text and "2_shapes (6 images)" in text

    progress = re.findall(r"step (\d+)/4 epoch \d loss \d+\.\d+ \(mean of \d+: \d+\.\d+\) lr \S+ "
                          r"grad_norm \S+ \| \d+\.\d+ it/s \d+\.\d+ samples/s ETA \d+:\d\d:\d\d \| "
                          r"memory rss \d+MiB rss_peak \d+MiB", text)
    assert progress == ["1", "2", "4"]             # the first step, every 2nd, the last
    assert "event checkpoint: step 3 -> " in text and "event checkpoint: step 4 -> " in text
    assert re.search(r"event preview: step 3, 1 image\(s\): .*step-0003\.png", text)
    assert "run finished at step 4 of 4" in text


def test_train_log_is_readable_while_training(monitored_run):
    _, reader, _ = monitored_run
    # each record is flushed: a step's progress line is in the file before the next step starts
    assert "step 2/4 " in reader.seen_at_step[2]
    assert "step 4/4 " not in reader.seen_at_step[2]


@pytest.fixture
def restore_lora_trainer_logger():
    """cli.main adds a console handler per call; take it off again so later tests do not write
    to this test's captured stderr."""
    logger = logging.getLogger("lora_trainer")
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_failure_leaves_the_stack_in_train_log_and_only_the_message_on_the_console(
        make_config, monkeypatch, capsys, restore_lora_trainer_logger):
    def broken_predict(backbone, noisy, timesteps, cond):
        raise ValueError("injected failure inside a training step")
    monkeypatch.setattr(DiffusersBackbone, "predict", broken_predict)
    config_path = make_config("broken", max_train_steps=2, tensorboard=False)

    assert cli_main(["train", "--config", str(config_path), "--quiet"]) == 1

    err = capsys.readouterr().err
    assert "error: ValueError: injected failure inside a training step" in err
    assert "Traceback" not in err
    log_text = (Path(load_config(config_path).run_dir) / "logs" / "train.log").read_text(encoding="utf-8")
    assert "training failed" in log_text and "Traceback (most recent call last)" in log_text
    for frame in ("in _train_step", "in _forward_backward", "in broken_predict"):
        assert frame in log_text, frame
    assert "ValueError: injected failure inside a training step" in log_text


# ---- TensorBoard ----------------------------------------------------------------------------------------
def test_tensorboard_has_the_scalars_and_previews(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = monitored_run
    events = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/raw", "loss/ema", "lr", "grad_norm", "speed/samples_per_s", "memory/rss_mib"} <= scalars
    raw = events.Scalars("loss/raw")
    assert [e.step for e in raw] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in raw)
    assert events.Scalars("loss/ema")[0].value == pytest.approx(raw[0].value, rel=1e-6)  # bias-corrected
    assert events.Scalars("lr")[0].value == pytest.approx(1e-3)
    previews = events.Images("preview/00")
    assert [p.step for p in previews] == [0, 3, 4]        # at start, every 3 steps, at the end
    assert (previews[0].width, previews[0].height) == (16, 12)


def test_training_runs_without_tensorboard_installed(make_config, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import now fails
    cfg = load_config(make_config("no_tb", max_train_steps=1))
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        result = train_from_config(cfg)
    assert result.status == "finished"
    assert not (Path(cfg.run_dir) / "tensorboard").exists()
    assert "TensorBoard logging off" in caplog.text


# ---- doctor ---------------------------------------------------------------------------------------------
def test_doctor_reports_the_environment_and_exits_0(capsys, restore_lora_trainer_logger):
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\[  ok\] torch +{re.escape(torch.__version__)}", out)
    for name in ("python", "diffusers", "transformers", "safetensors", "gradio", "open_clip_torch",
                 "bitsandbytes", "RAM", "disk (cwd)"):
        assert re.search(rf"\] {re.escape(name)} ", out), name
    assert "All required checks passed." in out


def test_doctor_exits_1_when_a_required_package_is_missing(capsys, monkeypatch, restore_lora_trainer_logger):
    real = system.package_version
    monkeypatch.setattr(system, "package_version", lambda d: None if d == "safetensors" else real(d))
    assert cli_main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[fail\] safetensors +not installed \(needs >=0\.4; required\)", out)


def test_doctor_dry_run_times_a_step_and_leaves_nothing_behind(make_config, tmp_path, monkeypatch, capsys,
                                                                restore_lora_trainer_logger):
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp_root))
    config_path = make_config("doctor")
    cfg = load_config(config_path)

    assert cli_main(["doctor", "--config", str(config_path)]) == 0

    out = capsys.readouterr().out
    assert re.search(r"step time +\d+\.\d{3} s per optimizer step \(first step \d+\.\d{3} s", out)
    assert re.search(r"estimate +12 steps x \d+\.\d{3} s = \d+:\d\d:\d\d", out)   # 6 steps x 2 epochs
    assert re.search(r"peak memory +RSS peak \d+\.\d\d GiB \(in \w+\); load \d", out)   # the load counts
    assert re.search(r"memory fit +predicted peak \d+\.\d GiB .*: fits", out)
    assert re.search(r"estimate .* \+ 1 preview image\(s\)", out)   # the card's thumbnail at the end
    assert not Path(cfg.output_dir).exists() and not Path(cfg.run_dir).exists()
    assert list(temp_root.iterdir()) == []


def test_doctor_says_a_run_does_not_fit_before_loading_it(make_config, monkeypatch, capsys,
                                                           restore_lora_trainer_logger):
    monkeypatch.setattr(system, "free_ram", lambda: 256 << 20)
    monkeypatch.setattr(doctor, "dry_run", lambda *a, **k: pytest.fail("a run that does not fit was loaded"))
    assert cli_main(["doctor", "--config", str(make_config("tight"))]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[fail\] memory fit +predicted peak .* 0\.2 GiB RAM available: does not fit", out)
    assert "base_dtype: bf16" in out


def test_doctor_requirements_mirror_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["diffusers"]:
        name, _, minimum = requirement.partition(">=")
        declared[name.strip().lower()] = minimum.strip()
    ours = {dist: minimum for dist, minimum, when in doctor.REQUIREMENTS if when != "optional"}
    assert ours == declared


def test_a_tensorboard_failure_turns_tensorboard_off_instead_of_ending_the_run():
    from lora_trainer.monitor.tensorboard_log import TensorBoardLog
    from lora_trainer.training.control import StepReport

    class FullDiskWriter:
        def __init__(self, **kwargs):
            pass

        def add_scalar(self, *args):
            raise OSError(28, "No space left on device")

    board = TensorBoardLog(FullDiskWriter, Path("unused"), "cpu")
    board.on_start({"resumed": False, "start_step": 0})
    board.on_step(StepReport(1, 4, 0, 0.5, 1e-3, None, 0.1, 2))     # must not raise
    assert board.writer is None


@pytest.fixture
def inside_a_webui(tmp_path, monkeypatch):
    """A stand-in WebUI: a `modules` package with `shared` and `paths_internal`, and its pins."""
    root = tmp_path / "webui"
    (root / "modules").mkdir(parents=True)
    (root / "modules" / "__init__.py").write_text("")
    (root / "modules" / "shared.py").write_text("")
    (root / "modules" / "paths_internal.py").write_text(f"script_path = {str(root)!r}\n")
    (root / "requirements_versions.txt").write_text(
        f"torch\nsafetensors=={system.package_version('safetensors')}\nnumpy==0.0.1  # too old on purpose\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]


def test_doctor_inside_a_webui_checks_its_pins_and_needs_no_diffusers(inside_a_webui, monkeypatch, capsys,
                                                                      restore_lora_trainer_logger):
    real = system.package_version
    monkeypatch.setattr(system, "package_version", lambda d: None if d == "diffusers" else real(d))
    assert cli_main(["doctor"]) == 0          # diffusers is only needed outside the WebUI
    out = capsys.readouterr().out
    assert "[info] WebUI" in out and str(inside_a_webui) in out
    assert re.search(r"\[  ok\] pin safetensors +WebUI pins", out)
    assert re.search(r"\[warn\] pin numpy +WebUI pins 0\.0\.1, installed", out)
    assert re.search(r"\[info\] diffusers +not installed .*not needed in the WebUI", out)


def test_time_estimates_count_the_previews_still_to_come_and_the_card(make_config):
    from lora_trainer.monitor.run_log import preview_cost

    cfg = load_config(make_config(preview_prompts=["a", "b"], preview_every_n_steps=10, preview_steps=3))
    # from the start: before step 1, at 10 and 20, and the end-of-run render (30): 4 x 2 prompts
    assert preview_cost(cfg, 0, 30, 1.0) == (pytest.approx(8 * 3 * 2 / 3 / cfg.batch_size), 8)
    assert preview_cost(cfg, 15, 30, 1.0)[1] == 4   # at 20 and at the end
    card_only = load_config(make_config("card", write_card=True))
    assert preview_cost(card_only, 29, 30, 2.0)[1] == 1   # the card's thumbnail, rendered at the end
