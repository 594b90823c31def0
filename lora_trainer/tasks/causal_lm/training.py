"""The causal-LM task inside the loop: length-bucketed (or packed) rows, the masked next-token
loss, and the PEFT adapter folder."""
from __future__ import annotations

from pathlib import Path

import torch

from ...lora.targets import select_targets
from .batch import batch_loss, collate
from .peft_export import peft_config, peft_tensors, write_peft_folder

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CausalLMTraining:
    data_unit = "samples"   # before packing; the plan's "samples per epoch" are rows
    def __init__(self, cfg, backbone, index):
        self.cfg, self.backbone, self.index = cfg, backbone, index
        self.output_path = Path(cfg.output_dir) / cfg.output_name
        tokenizer = backbone.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batch_keys(self):
        return self.index.length_buckets

    def lora_targets(self, preset: str):
        return select_targets(self.backbone.lora_targets(), preset, False)

    def init_network(self, network, say) -> None:
        pass   # init_lora_from is an SD setting (kohya files)

    def prepare(self) -> None:
        pass   # tokenised at indexing; nothing to cache

    def loss(self, epoch, chunk, autocast):
        rows = [self.index.records[record] for _, record in chunk]
        batch = collate(rows, self.pad_id, self.backbone.device)
        with autocast():
            return batch_loss(self.backbone.model, batch)

    def export(self, trainer, path: Path) -> None:
        cfg, network = self.cfg, trainer.network
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
        write_peft_folder(path, peft_tensors(network, self.backbone.module_paths, PRECISIONS[cfg.save_precision]),
                          peft_config(network, self.backbone.module_paths, Path(cfg.base_model).name,
                                      cfg.lora_rank, alpha))

    def snapshot_path(self, step: int) -> Path:
        return self.output_path.with_name(f"{self.cfg.output_name}-{step:06d}")

    def describe(self, say, warn) -> None:
        say(f"Base model: {self.backbone.detected}")
        say(f"Data: {self.index.describe()}")
        say(f"Loss on: {'every token' if self.cfg.train_on == 'all' else 'completions and assistant turns'}"
            + ("" if self.index.template_used else " (the tokenizer has no chat template: chats use "
               "'role: content' lines)"))

    def finish_hint(self) -> str:
        return f"load it with peft.PeftModel.from_pretrained(model, \"{self.output_path}\")"

    def size_lever(self) -> str:
        return f"lower max_seq_length (now {self.cfg.max_seq_length})"
