"""task_type: causal_lm — a LoRA on the attention and MLP projections of a Hugging Face causal
language model (LLaMA first; any AutoModelForCausalLM that loads offline from safetensors), trained
on .jsonl/.txt with a masked next-token loss, written as a PEFT adapter folder."""
from __future__ import annotations


class CausalLMTask:
    name = "causal_lm"

    def load_backbone(self, cfg, device, dtype):
        from .model import load_causal_lm

        return load_causal_lm(cfg.base_model, device, dtype)

    def index_dataset(self, cfg):
        from .dataset import index_lm_dataset

        return index_lm_dataset(cfg)

    def check_data(self, index, cfg, logger=None, findings=None):
        from .check import check_before_training

        return check_before_training(index, cfg, logger, findings)

    def training(self, cfg, backbone, index):
        from .training import CausalLMTraining

        return CausalLMTraining(cfg, backbone, index)

    def previewer(self, cfg):
        from .preview import TextPreviewer

        return TextPreviewer(cfg) if cfg.preview_prompts else None

    def observers(self, cfg, backbone, index) -> list:
        return []


TASK = CausalLMTask()
