"""The opt-in fast path (`compile: true`, issue "faster than the eager floor"): the compiled
training step trains the same LoRA as the eager one within a stated tolerance, resumes exactly
within its own mode, leaves previews (no_grad) on the eager model, and is refused with the field
named where it cannot run.

Graph capture here uses `compile_backend: aot_eager` (dynamo + AOTAutograd, torch's own kernels):
inductor's code generation takes minutes per run on this machine. Set LORA_TRAINER_TEST_INDUCTOR=1
to run the same checks with inductor (the speed itself is measured in benchmarks/bench_fastpath.py,
which also checks inductor's tolerance and exact resume on the benchmark model).
"""
from __future__ import annotations

import os

import pytest
import torch

from lora_trainer.backbones import compiled
from lora_trainer.lora.kohya_file import read_lora_file
from test_resume import RUN, assert_identical, final_state, finished_reference, train

BACKEND = "inductor" if os.environ.get("LORA_TRAINER_TEST_INDUCTOR") == "1" else "aot_eager"
FAST = dict(RUN, compile=True, compile_backend=BACKEND)
# eager vs compiled after 9 AdamW steps at lr 5e-3: the graphs reorder float sums (inductor fuses
# them), so the LoRA differs in the last bits; measured 2.5e-5 absolute (1e-3 of the largest
# weight) with inductor
TOLERANCE = dict(rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def compiled_reference(tmp_path_factory, tiny_sd1, shapes_dataset):
    return finished_reference(tmp_path_factory.mktemp("compiled"), tiny_sd1, shapes_dataset, **FAST)


def test_compiled_training_matches_eager_within_tolerance(make_config, compiled_reference):
    eager = read_lora_file(train(make_config(**RUN)).lora_path)[0]
    fast = compiled_reference[0]
    assert eager.keys() == fast.keys()
    moved = [k for k in eager if "lora_up" in k and eager[k].abs().max() > 0]
    assert moved, "the run must have trained something for the comparison to mean anything"
    for k in eager:
        torch.testing.assert_close(fast[k], eager[k], **TOLERANCE, msg=k)


def test_a_compiled_run_resumes_exactly_in_compiled_mode(make_config, compiled_reference, monkeypatch):
    kernels = _spy_on_optimizer_kernel(monkeypatch)
    cfg = make_config(**FAST)
    stopped = train(cfg, stop_at=3)
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = train(cfg)
    assert resumed.status == "finished"
    assert_identical(final_state(resumed), compiled_reference)   # the fused optimizer's state included
    assert kernels == ["fused", "fused"]


def _spy_on_optimizer_kernel(monkeypatch) -> list[str]:
    """Records which AdamW kernel each Trainer built: the fast path takes the fused one."""
    from lora_trainer.training import trainer as trainer_module

    kernels: list[str] = []
    real = trainer_module.build_optimizer

    def spy(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        kernels.append("fused" if optimizer.defaults.get("fused") else
                       "foreach" if optimizer.defaults.get("foreach") else "loop")
        return optimizer

    monkeypatch.setattr(trainer_module, "build_optimizer", spy)
    return kernels


def test_switching_compile_on_resume_needs_force(make_config, monkeypatch):
    from lora_trainer.training.resume import ResumeRefused

    kernels = _spy_on_optimizer_kernel(monkeypatch)
    cfg = make_config(**RUN)
    assert train(cfg, stop_at=1).status == "stopped"
    assert kernels == ["foreach"]   # eager keeps the kernel that matches torch's loop bit for bit
    with pytest.raises(ResumeRefused, match="compile"):
        train(cfg, compile=True, compile_backend=BACKEND)


def test_only_the_training_call_is_compiled(tiny_sd1):
    """Previews run under no_grad on the eager module; the module itself is never replaced."""
    from lora_trainer.backbones.diffusers_sd import load_backbone

    backbone = load_backbone(str(tiny_sd1["single_file"]), device="cpu")
    unet = backbone.unet
    calls = []
    backbone.compile_training_step(BACKEND)
    backbone._training_unet = lambda *a, **k: calls.append("compiled") or unet(*a, **k)
    latents = torch.randn(1, 4, 8, 8)
    cond = backbone.encode_text(["a"])
    with torch.no_grad():
        backbone.predict(latents, torch.tensor([10]), cond)
    assert calls == [] and backbone.unet is unet
    backbone.predict(latents, torch.tensor([10]), cond)
    assert calls == ["compiled"]


def test_no_cpu_compiler_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"compile: true.*C\+\+ compiler.*compile: false"):
        compiled.compiled_for_training(torch.nn.Linear(2, 2), torch.device("cpu"))
    # the backend without code generation needs no compiler
    compiled.compiled_for_training(torch.nn.Linear(2, 2), torch.device("cpu"), "aot_eager")


def test_the_webui_model_refuses_compile_with_the_reason():
    from lora_trainer.webui.backbone import WebuiBackbone

    backbone = WebuiBackbone.__new__(WebuiBackbone)   # the refusal needs no loaded model
    with pytest.raises(ValueError, match="compile: true is headless only.*compile: false"):
        backbone.compile_training_step()


def test_bf16_on_a_cpu_that_emulates_it_is_flagged(monkeypatch, make_config):
    from lora_trainer.app.session import precision_advice
    from lora_trainer.config import load_config
    from lora_trainer.monitor import system

    cfg = load_config(make_config(mixed_precision="bf16"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(system, "cpu_native_bf16", lambda: "")
    assert "mixed_precision: no" in precision_advice(cfg, cpu)
    monkeypatch.setattr(system, "cpu_native_bf16", lambda: "AVX512-BF16")
    assert precision_advice(cfg, cpu) is None
    monkeypatch.setattr(system, "cpu_native_bf16", lambda: "")
    assert precision_advice(load_config(make_config(name="fp32")), cpu) is None


def test_doctor_checks_the_compiler_a_compiled_run_needs(monkeypatch, make_config):
    from lora_trainer.app.doctor import config_checks
    from lora_trainer.config import load_config

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    [check] = [c for c in config_checks(load_config(make_config(compile=True))) if c.name == "compile"]
    assert check.status == "fail" and "C++ compiler" in check.detail
    assert not [c for c in config_checks(load_config(make_config(name="eager"))) if c.name == "compile"]
