"""Previews of a causal-LM run: each preview prompt continued greedily (deterministic, and no
random draw, so a preview never changes the training RNG) with the adapter as trained so far.
The texts go to train.log and to previews/step-<N>.txt (TensorBoard shows that file as text)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...storage.atomic import atomic_write_text

log = logging.getLogger("lora_trainer")


class TextPreviewer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.prompts = list(cfg.preview_prompts)
        self.folder = Path(cfg.run_dir) / "previews"

    def _input_ids(self, tokenizer, prompt: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt)["input_ids"]

    def generate(self, backbone, prompt: str) -> str:
        tokenizer, model = backbone.tokenizer, backbone.model
        ids = torch.tensor([self._input_ids(tokenizer, prompt)], device=backbone.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=self.cfg.preview_max_new_tokens, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        finally:
            model.train(was_training)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def render(self, trainer, step: int) -> list[Path]:
        lines = []
        for i, prompt in enumerate(self.prompts):
            text = self.generate(trainer.backbone, prompt)
            log.info("preview %d at step %d: %r -> %r", i, step, prompt, text)
            lines.append(f"### {prompt}\n{text}\n")
        path = self.folder / f"step-{step:08d}.txt"
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines))
        return [path]
