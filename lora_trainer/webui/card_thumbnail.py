"""A Lora card thumbnail for a run without preview prompts.

With `write_card` on, the WebUI's Lora card gets `<name>.preview.png` from the previews. A user who
set no preview prompt still expects a picture on the card rather than the blank "no preview"
card, so `CardThumbnailPreviewer` renders one image at the end of the run (only when it finishes,
nothing before or during training): the card's activation text (the trigger word, else the tags
most captions share) with `<lora:{name}:0.7>`, through the WebUI's txt2img at the run's preview
settings (preview_steps, size, seed, sampler, CFG scale, negative prompt). The image also lands in
`run_dir/previews/<last step>/` and the tab's preview gallery. `write_card: false` turns it off.
"""
from __future__ import annotations

from ..preview.cards import PREFERRED_WEIGHT, activation_text
from ..preview.prompt_syntax import TRAINED_PLACEHOLDER
from .env import WebuiEnv


def thumbnail_prompt(cfg, index) -> str:
    tag = f"<lora:{TRAINED_PLACEHOLDER}:{PREFERRED_WEIGHT:g}>"
    words = activation_text(cfg, index) if index is not None else cfg.trigger_word
    return f"{words}, {tag}" if words else tag


class CardThumbnailPreviewer:
    """The previewer of a run with write_card on and no preview prompts: renders only at the end."""

    def __init__(self, cfg, env: WebuiEnv):
        self.cfg, self.env = cfg, env

    def render(self, trainer, step: int) -> list:
        if step < trainer.plan.total_steps:      # before the first step, preview_every_n_steps
            return []
        from .preview import WebuiPreviewer

        prompt = thumbnail_prompt(self.cfg, getattr(trainer, "index", None))
        return WebuiPreviewer(self.cfg, self.env, prompts=[prompt]).render(trainer, step)
