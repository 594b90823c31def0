"""task_type: causal_lm on the shared loop: loss masks, the PEFT adapter, kill -9 + resume, resume
refusals, 2 processes vs 1, and data errors that name file and line.

Model: the demo's tiny random LLaMA (2 layers, width 64) and its BPE tokenizer, both made offline.
Data: the demo's 14 samples (chats, prompt/completion, plain text).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_trainer.config import ConfigError, config_from_dict, load_config
from lora_trainer.storage.checkpoints import CheckpointStore
from lora_trainer.tasks.causal_lm import tiny
from lora_trainer.tasks.causal_lm.batch import batch_loss, collate
from lora_trainer.tasks.causal_lm.encode import Encoder
from lora_trainer.tasks.causal_lm.model import ModelFolderError, load_causal_lm, load_tokenizer, safetensors_files
from lora_trainer.tasks.causal_lm.records import LMDataError, RawSample, read_samples
from lora_trainer.training.resume import ResumeRefused
from lora_trainer.app.session import run_training, train_from_config
from support import write_config

FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")
# 14 samples, batch 2, accumulation 2 -> 7 batches, 4 steps per epoch, 2 epochs = 8 steps
RUN = dict(task_type="causal_lm", max_seq_length=64, batch_size=2, gradient_accumulation_steps=2,
           epochs=2, learning_rate=1e-2, save_steps=3, lr_scheduler="cosine", lr_warmup_steps=2,
           keep_last_n_checkpoints=10, target_modules="attn-mlp", lora_rank=4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", tiny.demo_texts())


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return tiny.write_demo_dataset(tmp_path_factory.mktemp("chats"))


@pytest.fixture
def lm_config(tmp_path, llama, chats):
    def make(name="run", **values):
        return write_config(tmp_path / name, **{"train_data_dir": chats, "base_model": llama, **RUN, **values})
    return make


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, keep in zip(sample.input_ids, sample.trainable) if keep])


# ---- data: masks, errors ---------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_answers(llama):
    tokenizer = load_tokenizer(llama)
    encoder = Encoder(tokenizer, "completion", 128, "fail")
    chat = RawSample("c.jsonl:1", "messages", messages=(("system", "Be brief."), ("user", "Colour of the sky?"),
                                                         ("assistant", "The sky is blue."), ("user", "And the sun?"),
                                                         ("assistant", "The sun is yellow.")))
    sample = encoder.encode(chat)
    # both answers and their end-of-turn token, nothing of the system/user turns or role markers
    assert trained_text(tokenizer, sample) == "The sky is blue.<|end|>\nThe sun is yellow.<|end|>\n"
    assert tokenizer.decode(sample.input_ids).startswith("<s><|system|>\nBe brief.<|end|>")
    completion = encoder.encode(RawSample("p.jsonl:1", "prompt", prompt="Name the colour: ", completion="red."))
    # the prompt's last space and the first word are one token (" red"): it is trained, not dropped
    assert trained_text(tokenizer, completion) == " red.</s>"
    assert sample.trainable[0] is False and completion.trainable[0] is False
    everything = Encoder(tokenizer, "all", 128, "fail").encode(chat)
    assert sum(everything.trainable) == len(everything.input_ids) - 1


def test_bad_inputs_name_file_and_line(tmp_path, llama):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "fine"}\n{"messages": [{"content": "hi"}]}\n{"text": "x",\n'
                                  '{"prompt": "only a prompt"}\n', encoding="utf-8")
    with pytest.raises(LMDataError) as caught:
        read_samples(data)
    text = str(caught.value)
    assert "a.jsonl:2: message 0 has no 'role'" in text
    assert "a.jsonl:3: not valid JSON" in text
    assert "a.jsonl:4: 'prompt' and 'completion' go together" in text
    # too long for max_seq_length: refused with its line (or truncated and reported, when asked)
    (data / "a.jsonl").write_text('{"text": "short"}\n{"text": "' + "red apple " * 40 + '"}\n', encoding="utf-8")
    cfg = load_config(write_config(tmp_path / "cfg", task_type="causal_lm", train_data_dir=data, base_model=llama,
                                   max_seq_length=16))
    with pytest.raises(LMDataError, match=r"a\.jsonl:2: \d+ tokens, longer than max_seq_length 16"):
        train_from_config(cfg)
    from lora_trainer.tasks.causal_lm.check import full_check
    report = full_check(cfg)
    assert [(f.code, f.files) for f in report["findings"] if f.severity == "error"] == [("too_long", ["a.jsonl:2"])]
    assert sum(count for _, _, count in report["histogram"]) == 1


def test_pickle_only_model_folder_is_refused_by_name(tmp_path):
    folder = tmp_path / "old-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelFolderError, match=r"old-model' has only pickle weights \(pytorch_model\.bin\)"):
        safetensors_files(folder)


def test_image_settings_are_neither_required_nor_checked_for_causal_lm(tmp_path, llama, chats):
    cfg = config_from_dict({"task_type": "causal_lm", "train_data_dir": str(chats), "base_model": str(llama),
                            "metadata_path": "missing.csv", "resolution": 768}, tmp_path)
    assert cfg.task_type == "causal_lm"
    with pytest.raises(ConfigError, match="target_modules: 'locon' does not apply to task_type causal_lm"):
        config_from_dict({"task_type": "causal_lm", "train_data_dir": str(chats), "base_model": str(llama),
                          "target_modules": "locon"}, tmp_path)


# ---- training: the adapter, the loss, PEFT --------------------------------------------------------

def training_set_loss(backbone, index) -> float:
    with torch.no_grad():
        pad = backbone.tokenizer.pad_token_id
        return float(torch.stack([batch_loss(backbone.model, collate([row], pad, backbone.device))
                                  for row in index.records]).mean())


def test_training_lowers_the_loss_and_peft_reproduces_the_logits(lm_config, llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_trainer.tasks import task_for

    cfg = load_config(lm_config(epochs=4, gradient_accumulation_steps=1, learning_rate=2e-2, lr_scheduler="constant",
                                preview_prompts=["What colour is the sky?"], preview_every_n_steps=14))
    task = task_for("causal_lm")
    backbone = task.load_backbone(cfg, torch.device("cpu"), torch.float32)
    index = task.index_dataset(cfg)
    before = training_set_loss(backbone, index)
    result = run_training(cfg, backbone, index=index)
    assert result.status == "finished" and result.step == 28   # 7 batches x 4 epochs
    after = training_set_loss(backbone, index)   # the adapters stay attached to the model
    assert after < 0.5 * before, (before, after)

    fresh = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, str(result.lora_path)).eval()
    batch = collate(index.records[:4], backbone.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max() <= 1e-5
    config = json.loads((result.lora_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    log = (result.run_dir / "logs" / "train.log").read_text()
    assert "preview 0 at step 14: 'What colour is the sky?' ->" in log
    assert (result.run_dir / "previews" / "step-00000028.txt").is_file()


# ---- crash safety and resume ----------------------------------------------------------------------

def adapter_bytes(cfg_path) -> bytes:
    cfg = load_config(cfg_path)
    return (Path(cfg.output_dir) / cfg.output_name / "adapter_model.safetensors").read_bytes()


def run_fault(cfg, *args, expect_rc):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(FAULT_RUNNER.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(FAULT_RUNNER), str(cfg), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_kill_9_mid_step_then_rerun_gives_the_byte_identical_adapter(lm_config):
    reference = lm_config("reference")
    assert train_from_config(load_config(reference)).status == "finished"
    cfg = lm_config("killed")
    # micro-batch 9 is the first half of step 5: checkpoint 3 exists, step 4 is lost
    run_fault(cfg, "--kill-at-micro", 9, expect_rc=-signal.SIGKILL)
    assert [i.step for i in CheckpointStore(load_config(cfg).run_dir).list()] == [3]
    proc = run_fault(cfg, expect_rc=0)
    assert "Resuming from step 3 of 8" in proc.stdout
    assert adapter_bytes(cfg) == adapter_bytes(reference)


def test_resume_refuses_another_rank_or_base_model(lm_config, tmp_path):
    cfg = lm_config()
    assert train_from_config(load_config(cfg, {"max_train_steps": 3})).status == "finished"
    with pytest.raises(ResumeRefused, match="lora_rank: 4 -> 8"):
        train_from_config(load_config(cfg, {"lora_rank": 8, "max_train_steps": 20}), force_resume=True)
    other = tiny.write_tiny_llama(tmp_path / "other-llama", tiny.demo_texts(), seed=1)
    with pytest.raises(ResumeRefused, match="base model: the checkpoint was trained on"):
        train_from_config(load_config(cfg, {"base_model": str(other), "max_train_steps": 20}), force_resume=True)


def test_two_processes_match_one_process_with_the_same_effective_batch(lm_config):
    from test_distributed import torchrun

    multi = lm_config("multi", gradient_accumulation_steps=1, save_steps=4)
    proc = torchrun(["-m", "lora_trainer", "train", "--config", str(multi), "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = train_from_config(load_config(lm_config("single", gradient_accumulation_steps=2, save_steps=4)))
    assert single.step == 8
    from safetensors.torch import load_file
    a = load_file(str(Path(load_config(multi).output_dir) / "test_lora" / "adapter_model.safetensors"))
    b = load_file(str(single.lora_path / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    log = (Path(load_config(multi).run_dir) / "logs" / "train.log").read_text()
    assert log.count("Finished 8 steps") == 1


def test_the_webui_tab_refuses_a_causal_lm_config(lm_config):
    from lora_trainer.webui import job

    with pytest.raises(job.CannotTrain, match="task_type causal_lm cannot train in the WebUI"):
        job.train_on_loaded_model(load_config(lm_config()))


def test_check_data_reports_lengths_duplicates_and_bad_lines(lm_config, chats, tmp_path, capsys):
    from lora_trainer import cli

    data = tmp_path / "data.jsonl"
    rows = (chats / "colours.jsonl").read_text().splitlines()
    data.write_text("\n".join([*rows, rows[0], '{"messages": [{"role": "robot", "content": "hi"}]}']) + "\n")
    cfg = lm_config(train_data_dir=data)
    assert cli.main(["check-data", str(cfg), "--out", str(tmp_path / "report"), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "message 0 has role 'robot'; expected one of system, user, assistant, tool [data.jsonl:14]" in out
    assert "2 identical samples [data.jsonl:1, data.jsonl:13]" in out
    assert "token lengths (max_seq_length 64):" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sum(count for _, _, count in report["histogram"]) == 13


def test_out_of_memory_halves_the_micro_batch_and_trains_the_same_adapter(lm_config, monkeypatch):
    from safetensors.torch import load_file

    from lora_trainer.tasks.causal_lm import training

    plain = train_from_config(load_config(lm_config("plain", max_train_steps=2)))
    real, calls = training.batch_loss, []

    def tight_memory(model, batch):
        calls.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch)
    monkeypatch.setattr(training, "batch_loss", tight_memory)
    halved = train_from_config(load_config(lm_config("halved", max_train_steps=2)))
    assert calls[0] == 2 and set(calls[1:]) == {1}
    a = load_file(str(plain.lora_path / "adapter_model.safetensors"))
    b = load_file(str(halved.lora_path / "adapter_model.safetensors"))
    # the same samples per step; only float summation order (and padding) differ, which Adam's
    # normalised first steps can turn into differences of ~1e-5 on weights of ~1e-2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert "micro-batch halved to 1" in (halved.run_dir / "logs" / "train.log").read_text()


def test_packed_samples_do_not_see_each_other(llama, chats):
    from lora_trainer.tasks.causal_lm.dataset import LMDataset, Row
    from lora_trainer.tasks.causal_lm.encode import encode_all

    backbone = load_causal_lm(str(llama), torch.device("cpu"), torch.float32)
    samples = encode_all(Encoder(backbone.tokenizer, "completion", 64, "fail"), read_samples(chats))
    packed = LMDataset(samples, 64, packing=True)
    assert len(packed.records) < len(samples) and all(r.length <= 64 for r in packed.records)
    assert [s for r in packed.records for s in r.samples] == samples   # file order, none split or lost
    row = next(r for r in packed.records if len(r.samples) > 1)
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        batch = collate([row], pad, backbone.device)
        together = backbone.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  attention_mask=batch["attention_mask"]).logits[0]
        at = 0
        for sample in row.samples:   # each sample's logits as if it were alone in the row
            alone = collate([Row((sample,))], pad, backbone.device)
            logits = backbone.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0]
            n = len(sample.input_ids)
            assert torch.allclose(together[at:at + n], logits, atol=1e-5)
            at += n
