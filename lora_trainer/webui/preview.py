"""Previews inside the WebUI, through the WebUI's own txt2img pipeline.

`WebuiPreviewer.render(trainer, step)` has the headless Previewer's contract (list of PNG paths
under `run_dir/previews/<step>/`), but renders exactly what txt2img will produce for the prompt:

1. the training network is detached (its adapters are not in the forward path any more) and the
   current LoRA is saved to its file (`trainer.save_lora`, normally in models/Lora). Not while the
   LoRA is still untrained (every `up` is zero, e.g. the preview before the first step): it adds
   exactly nothing, so its tags are left out of the prompts and no file is written; a LoRA of
   that name from an earlier run stays as it is until the first real save;
2. the WebUI's caches that would show a stale result are dropped (Lora card list, the Lora
   extension's in-memory copy of that file and its per-layer merge record, the class-level
   prompt-conditioning cache);
3. every prompt runs through `processing.process_images(StableDiffusionProcessingTxt2Img(...))`
   with `{name}` replaced by the output name, so `<lora:{name}:0.7>` and any other `<lora:…>` are
   applied by the Lora extension from the saved files, at the config's preview size, steps, seed,
   CFG scale and sampler (our names mapped to the WebUI's);
4. afterwards, whatever happens: the Lora extension's merges are undone and verified
   (`lora_state.clean_base_weights`), the caches dropped again, the modules' train/eval flags,
   torch's global RNG (CPU and the GPU), Python's and NumPy's RNG and the grad mode put back, and
   the training network re-attached. Training draws its randomness per sample from its own
   generators, so a run with previews trains the same LoRA as one without.

Runs inside the job, which already holds the WebUI's queue lock (process_images does not take it).
"""
from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any

import torch

from ..preview.cards import write_card_preview
from ..preview.images import grid, save_png
from ..preview.prompt_syntax import (LORA_TAG_KINDS, TAG_PATTERN, TRAINED_PLACEHOLDER, PreviewPrompt,
                                     parse_lora_tag, parse_prompt_lines)
from ..preview.sampler import SAMPLER_LABELS, SampleSettings, negative_prompt_for
from .env import WebuiEnv
from .lora_state import clean_base_weights, invalidate_webui_lora_caches

log = logging.getLogger("lora_trainer")

# our sampler names -> the WebUI's sampler names (sd_samplers); the same labels the infotext uses
WEBUI_SAMPLERS = dict(SAMPLER_LABELS)


def webui_sampler_name(ours: str) -> str:
    if ours not in WEBUI_SAMPLERS:
        raise ValueError(f"unknown preview sampler '{ours}' (one of {', '.join(WEBUI_SAMPLERS)})")
    return WEBUI_SAMPLERS[ours]


@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    """torch's global RNG (CPU and the training GPU), Python's and NumPy's, restored afterwards:
    the WebUI seeds the global generators for its noise."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    py_state = random.getstate()
    numpy_random: Any = None
    try:
        import numpy
        numpy_random = numpy.random
    except ImportError:   # pragma: no cover - numpy is always there with torch
        pass
    np_state = numpy_random.get_state() if numpy_random is not None else None
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        if numpy_random is not None:
            numpy_random.set_state(np_state)


@torch.no_grad()
def is_untrained(network) -> bool:
    """True while the LoRA adds exactly nothing: every adapter's zero-initialised factor is still zero."""
    return network.is_untrained()


class WebuiPreviewer:
    """Renders `prompts` (default cfg.preview_prompts) with the WebUI's process_images."""

    def __init__(self, cfg, env: WebuiEnv, prompts: list[str] | None = None):
        self.cfg = cfg
        self.env = env
        self.prompts: list[PreviewPrompt] = parse_prompt_lines(
            cfg.preview_prompts if prompts is None else prompts)
        for prompt in self.prompts:
            for note in prompt.notes:
                log.warning("Preview prompt %r: %s", prompt.line, note)
            webui_sampler_name(prompt.sampler or cfg.preview_sampler)   # fail at the start
        self._warn_if_not_found()

    def _warn_if_not_found(self) -> None:
        """The Lora extension only finds files under its own folder: a LoRA written elsewhere would
        be missing from every preview (the WebUI just logs "couldn't find Lora")."""
        from .paths import is_inside, lora_dir

        names_trained = any(TRAINED_PLACEHOLDER in p.prompt or f"<lora:{self.cfg.output_name}:" in p.prompt
                            for p in self.prompts)
        try:
            folder = lora_dir(self.env)
        except Exception:   # noqa: BLE001 - no folder to compare with
            return
        if names_trained and not is_inside(self.cfg.output_dir, folder):
            log.warning("Previews: the LoRA is saved to %s, outside the WebUI's Lora folder %s, so "
                        "<lora:%s:…> in the preview prompts will not find it; set the output folder "
                        "to the Lora folder (the default) to see it in previews.",
                        self.cfg.output_dir, folder, self.cfg.output_name)

    # ---- what one prompt asks for ---------------------------------------------------------------------
    def prompt_text(self, prompt: PreviewPrompt, without_trained: bool = False) -> str:
        """The prompt as txt2img gets it: tags kept, `{name}` = the LoRA file's name;
        `without_trained` drops the tags of the LoRA being trained (while it is all zeros)."""
        text = prompt.prompt.replace(TRAINED_PLACEHOLDER, self.cfg.output_name)
        if without_trained:
            text = TAG_PATTERN.sub(lambda m: "" if self._names_trained(m) else m.group(0), text).strip()
        return text

    def _names_trained(self, match) -> bool:
        kind, arguments = match.group(1), match.group(2)
        return kind in LORA_TAG_KINDS and \
            parse_lora_tag(arguments, match.group(0)).refers_to_trained(self.cfg.output_name)

    def processing_args(self, prompt: PreviewPrompt, without_trained: bool = False) -> dict:
        settings = SampleSettings.for_prompt(self.cfg, prompt)
        return dict(
            prompt=self.prompt_text(prompt, without_trained),
            negative_prompt=negative_prompt_for(self.cfg, prompt),
            steps=settings.steps, cfg_scale=settings.cfg_scale, width=settings.width,
            height=settings.height, seed=settings.seed, sampler_name=webui_sampler_name(settings.sampler),
            batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True)

    # ---- rendering --------------------------------------------------------------------------------------
    def render(self, trainer, step: int) -> list[Path]:
        folder = Path(trainer.run_dir) / "previews" / f"{step:06d}"
        env, model = self.env, self.env.sd_model
        trainer.say(f"Previews at step {step}: {len(self.prompts)} prompt(s) through the WebUI's txt2img")
        untrained = is_untrained(trainer.network)
        # the file the Lora extension will apply; an all-zero LoRA is left out of the prompts instead
        lora_path = trainer.lora_path if untrained else trainer.save_lora()
        modes = [(m, m.training) for m in trainer.backbone.model.modules()]
        grad = torch.is_grad_enabled()
        network = trainer.network
        network.detach()
        images = []
        try:
            invalidate_webui_lora_caches(env, names=[Path(lora_path).stem])
            with _preserved_rng(trainer.backbone.device), torch.no_grad():
                trainer.backbone.model.eval()
                for n, prompt in enumerate(self.prompts):
                    image, info = self._process(prompt, untrained)
                    if image is None:
                        trainer.say(f"Preview {n}: the WebUI returned no image (interrupted?)")
                        continue
                    images.append((n, save_png(folder / f"{n}.png", image, info), image))
                    self._show(image)
        finally:
            try:
                restore = getattr(trainer.backbone, "restore_after_generation", None)
                if restore is not None:   # the host undoes its own LoRA patching (Forge)
                    restore()
                else:
                    report = clean_base_weights(model, env.networks)   # undo the extension's merges
                    log.debug("after previews: %s", report.summary())
                invalidate_webui_lora_caches(env, names=[Path(lora_path).stem])
            finally:
                for m, flag in modes:
                    m.training = flag
                network.attach()
                torch.set_grad_enabled(grad)
        paths = [path for _, path, _ in images]
        if images:
            paths.append(save_png(folder / "grid.png", grid([image for _, _, image in images])))
            if self.cfg.write_card and not untrained:    # the card shows the LoRA, not the base
                write_card_preview(trainer.lora_path, self._card_image(images))
        return paths

    def _process(self, prompt: PreviewPrompt, without_trained: bool = False):
        """(PIL image or None, infotext) from process_images."""
        processing = self.env.processing
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=self.env.sd_model,
                                                        **self.processing_args(prompt, without_trained))
        try:
            result = processing.process_images(p)
        finally:
            close = getattr(p, "close", None)
            if close is not None:
                close()
        if not result.images:
            return None, ""
        infotexts = getattr(result, "infotexts", None) or [getattr(result, "info", "")]
        return result.images[0], infotexts[0]

    def _show(self, image) -> None:
        """The WebUI's live image (the progress area) shows the preview just rendered."""
        state = self.env.state
        assign = getattr(state, "assign_current_image", None)
        try:
            if assign is not None:
                assign(image)
            elif state is not None:
                state.current_image = image
        except Exception:   # the live image is a nicety
            log.debug("could not show the preview in the WebUI", exc_info=True)

    def _card_image(self, images):
        for n, _, image in images:
            if TRAINED_PLACEHOLDER in self.prompts[n].prompt or \
                    f"<lora:{self.cfg.output_name}:" in self.prompt_text(self.prompts[n]):
                return image
        return images[0][2]
