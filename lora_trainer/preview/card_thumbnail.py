"""A Lora card thumbnail for a run without preview prompts.

With `write_card` on, the card gets `<name>.preview.png` from the previews. A user who set no
preview prompt still expects a picture on the card (the WebUI's Lora cards, other UIs that read
`.preview.png`) rather than a blank one, so `CardThumbnail` renders one image at the end of the
run (only when it finishes; nothing before or during training): the card's activation text (the
trigger word, else the tags most captions share) with `<lora:{name}:0.7>`, at the run's preview
settings (preview_steps, size, seed, sampler, CFG scale, negative prompt). The image also lands in
`run_dir/previews/<last step>/` (and the tab's gallery). `write_card: false` turns it off.

Whatever renders previews renders it: the headless Previewer, or inside the WebUI its txt2img
(`lora_trainer.webui.preview.WebuiPreviewer`); `make_previewer(prompts)` builds one.
"""
from __future__ import annotations

from typing import Callable, Protocol

from .cards import PREFERRED_WEIGHT, activation_text
from .prompt_syntax import TRAINED_PLACEHOLDER


def thumbnail_prompt(cfg, index) -> str:
    tag = f"<lora:{TRAINED_PLACEHOLDER}:{PREFERRED_WEIGHT:g}>"
    words = activation_text(cfg, index) if index is not None else cfg.trigger_word
    return f"{words}, {tag}" if words else tag


class _Renders(Protocol):
    """What the loop calls on a previewer (the headless Previewer, the WebUI's txt2img one)."""

    def render(self, trainer, step: int) -> list: ...


class CardThumbnail:
    """The previewer of a run with write_card on and no preview prompts: renders only at the end."""

    def __init__(self, cfg, make_previewer: Callable[[list], _Renders]):
        self.cfg, self.make_previewer = cfg, make_previewer

    def render(self, trainer, step: int) -> list:
        if step < trainer.plan.total_steps:      # before the first step, preview_every_n_steps
            return []
        prompt = thumbnail_prompt(self.cfg, getattr(trainer, "index", None))
        return self.make_previewer([prompt]).render(trainer, step)
