"""Resume inside the WebUI after a restart (stand-in model): the run folder under
`<extension>/runs/` continues on the loaded model when it is the same checkpoint, and is refused
with a clear message when another model is loaded."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.config import load_config
from lora_trainer.lora import host
from lora_trainer.lora.kohya_file import read_lora_file
from lora_trainer.training.control import TrainingObserver
from lora_trainer.ui import runs
from lora_trainer.webui import job
from lora_trainer.webui.backbone import WebuiBackbone
from lora_trainer.webui.env import WebuiEnv

sys.path.insert(0, str(Path(__file__).parent))
from webui_standin import StandInSD1, standin_env  # noqa: E402


def make_env(model, lora_dir: Path) -> WebuiEnv:
    """What the WebUI hands the job after a (re)start with `model` loaded."""
    return standin_env(model, lora_dir)


class InterruptAt(TrainingObserver):
    def __init__(self, env, step):
        self.env, self.step = env, step

    def on_step(self, report):
        if report.step == self.step:
            self.env.state.interrupt()


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    return folder


def start_and_stop(make_config, tmp_path, env, name="resumable"):
    cfg = load_config(make_config(name, max_train_steps=6, epochs=10, cache_latents_to_disk=False,
                                  resume=True, preview_prompts=[], write_card=False, output_name=name,
                                  output_dir=env.cmd_opts.lora_dir,
                                  run_dir=str(tmp_path / "extension" / "runs" / name)))
    stopped = job.train_on_loaded_model(cfg, env=env, observers=[InterruptAt(env, 2)])
    assert stopped.status == "stopped" and 0 < stopped.step < 6
    return cfg, stopped


def test_identity_is_the_same_after_a_restart_with_the_same_checkpoint(tiny_sd1):
    first = WebuiBackbone(StandInSD1(tiny_sd1["single_file"])).identity()
    again = WebuiBackbone(StandInSD1(tiny_sd1["single_file"])).identity()   # a new process, same file
    assert first["hash"] == again["hash"] and first["host"] == "webui"


def test_resume_after_restart_on_the_same_checkpoint(make_config, tmp_path, tiny_sd1, lora_dir):
    cfg, stopped = start_and_stop(make_config, tmp_path, make_env(StandInSD1(tiny_sd1["single_file"]), lora_dir))

    # "restart": a new model object from the same file, new WebUI handles; the tab lists the run
    model = StandInSD1(tiny_sd1["single_file"])
    env = make_env(model, lora_dir)
    found = runs.find_runs([tmp_path / "extension" / "runs"])
    assert [(r.name, r.step, r.resumable) for r in found] == [("resumable", stopped.step, True)]
    resumed_cfg = runs.resume_config(found[0].path, required=("train_data_dir",))
    assert resumed_cfg.resume and resumed_cfg.output_name == "resumable"
    clean = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = job.train_on_loaded_model(resumed_cfg, env=env)
    assert result.status == "finished" and result.step == 6
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, clean[k])] == []
    assert not any(host.has_adapters(m) for m in model.modules())

    # the same run without the stop and restart trains the same LoRA
    straight = job.train_on_loaded_model(
        load_config(make_config("straight", max_train_steps=6, epochs=10, cache_latents_to_disk=False,
                                resume=False, preview_prompts=[], write_card=False, output_name="resumable",
                                output_dir=str(tmp_path / "straight_out"),
                                run_dir=str(tmp_path / "straight_run"))), env=env)
    a, b = read_lora_file(result.lora_path)[0], read_lora_file(straight.lora_path)[0]
    assert set(a) == set(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_resume_refused_when_another_model_is_loaded(make_config, tmp_path, tiny_sd1, lora_dir):
    from lora_trainer.backbones import tiny

    cfg, stopped = start_and_stop(make_config, tmp_path, make_env(StandInSD1(tiny_sd1["single_file"]), lora_dir))
    other_file = tmp_path / "other" / "other-sd1.safetensors"
    other_file.parent.mkdir()
    components = tiny.build_tiny_sd1(seed=1)
    tiny.write_single_file(other_file, components)
    tiny.write_config_folder(other_file.parent / "other-sd1.config", components["configs"])
    model = StandInSD1(other_file)
    env = make_env(model, lora_dir)
    clean = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoints = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    with pytest.raises(job.CannotTrain, match=r"was trained on tiny-sd1\.safetensors .*other-sd1\.safetensors"
                                              r".*Load the run's checkpoint"):
        job.train_on_loaded_model(runs.resume_config(cfg.run_dir, required=("train_data_dir",)), env=env)
    # nothing touched: the run is still there to resume, the model is as it was
    assert sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir()) == checkpoints
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, clean[k])] == []
    assert not any(host.has_adapters(m) for m in model.modules()) and not job.is_training()
