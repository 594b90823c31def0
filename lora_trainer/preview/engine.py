"""Previews during training: render the configured prompts with the LoRA as it is right now.

`Previewer.render(trainer, step)` is what the trainer calls. For each prompt it sets the in-training
network's multipliers to the prompt's `<lora:NAME:te:unet>` weights (0 when the prompt does not
name it), attaches the other LoRAs the prompt names (from the LoRA folder) at their weights,
renders, and undoes all of it. The in-training adapters are never merged into the base weights, and
torch's RNG, the grad mode and every multiplier are restored afterwards, so a run with previews
trains the byte-identical LoRA of a run without.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from ..contracts.backbone import DiffusionBackbone
from ..lora.kohya_file import LoraFileError, network_tensors
from ..lora.targets import LoraTarget
from .cards import write_card_preview
from .images import grid, save_png, to_pil
from .lora_library import LoraLibrary, LoraNotFoundError
from .networks import NetworkCache, build_network
from .prompt_syntax import TRAINED_PLACEHOLDER, LoraTag, PreviewPrompt, parse_prompt_lines
from .sampler import SAMPLER_LABELS, SampleSettings, negative_prompt_for, render_image

log = logging.getLogger("lora_trainer")


# ---- state that a preview must leave exactly as it found it --------------------------------------

@contextlib.contextmanager
def preserved_training_state(network, device: torch.device):
    """Multipliers, torch's global RNG (CPU and the training GPU) and grad mode come back as they
    were, even when rendering fails."""
    multipliers = {name: adapter.multiplier for name, adapter in network.adapters.items()}
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield
    finally:
        for name, adapter in network.adapters.items():
            adapter.multiplier = multipliers[name]


@contextlib.contextmanager
def attached(networks):
    """Networks stacked on the live model for one image, detached afterwards whatever happens."""
    done = []
    try:
        for network in networks:
            done.append(network.attach())
        yield
    finally:
        for network in reversed(done):
            network.detach()


# ---- the previewer -------------------------------------------------------------------------------

class Previewer:
    """Renders `prompts` (default cfg.preview_prompts); other LoRAs they name are looked up in
    `lora_dir` (default cfg.lora_dir, else cfg.output_dir). Raises PromptSyntaxError or
    LoraNotFoundError at once for a bad prompt."""

    def __init__(self, cfg, lora_dir: str | Path | None = None, prompts: list[str] | None = None):
        self.cfg = cfg
        self.prompts: list[PreviewPrompt] = parse_prompt_lines(
            cfg.preview_prompts if prompts is None else prompts)
        self.library = LoraLibrary(lora_dir or cfg.lora_dir or cfg.output_dir)
        self.cache = NetworkCache()
        self._target_list: list[LoraTarget] | None = None
        for prompt in self.prompts:
            for note in prompt.notes:
                log.warning("Preview prompt %r: %s", prompt.line, note)
        self.check_names()

    def is_trained(self, tag: LoraTag) -> bool:
        return tag.refers_to_trained(self.cfg.output_name)

    def check_names(self) -> None:
        """Fail at the start, not hours later, when a prompt names a LoRA that is not there."""
        self.library.scan()
        for prompt in self.prompts:
            for tag in prompt.loras:
                if not self.is_trained(tag):
                    self.library.resolve(tag.name, tag.text)

    # ---- settings -----------------------------------------------------------------------------------
    def settings_for(self, prompt: PreviewPrompt) -> SampleSettings:
        return SampleSettings.for_prompt(self.cfg, prompt)

    def negative_for(self, prompt: PreviewPrompt) -> str:
        return negative_prompt_for(self.cfg, prompt)

    # ---- rendering ----------------------------------------------------------------------------------
    def render(self, trainer, step: int) -> list[Path]:
        folder = Path(trainer.run_dir) / "previews" / f"{step:06d}"
        self.library.scan()   # LoRAs written since the last preview are found, as in the WebUI
        with preserved_training_state(trainer.network, trainer.backbone.device):
            images = self._render_prompts(trainer, step, folder)
            sweep = self._render_sweep(trainer, step, folder) if self.cfg.preview_weight_sweep else []
        paths = [path for _, path, _ in images]
        if images:
            paths.append(save_png(folder / "grid.png", grid([image for _, _, image in images])))
            if self.cfg.write_card:
                write_card_preview(trainer.lora_path, self._card_image(images))
        return paths + sweep

    def _render_prompts(self, trainer, step: int, folder: Path) -> list[tuple]:
        """(prompt number, path, image) of every prompt that rendered."""
        images = []
        for n, prompt in enumerate(self.prompts):
            try:
                image, lora_hashes = self.render_prompt(trainer, prompt)
            except (LoraNotFoundError, LoraFileError) as error:  # a file renamed/broken mid-run
                # only this image is lost; stopping the training for it would cost far more
                trainer.say(f"Preview {n} skipped: {error}")
                continue
            info = self.infotext(trainer, prompt, step, lora_hashes)
            images.append((n, save_png(folder / f"{n}.png", image, info), image))
        return images

    def _card_image(self, images):
        """The thumbnail: the first image that shows the trained LoRA, else the first one."""
        for n, _, image in images:
            tag = self.prompts[n].lora_named(self.is_trained)
            if tag and (tag.te or tag.unet):
                return image
        return images[0][2]

    def render_prompt(self, trainer, prompt: PreviewPrompt, trained_weight: float | None = None):
        """(PIL image, {name: short hash} of the LoRA files used)."""
        image, hashes = self.render_tensor(trainer, prompt, trained_weight)
        return to_pil(image), hashes

    def render_tensor(self, trainer, prompt: PreviewPrompt, trained_weight: float | None = None):
        """(image [3,H,W] in [0,1], {name: short hash} of the LoRA files used). `trained_weight`
        overrides the prompt's weight of the trained LoRA (weight sweeps). Leaves the trained
        network's multipliers changed: callers restore them (see preserved_training_state)."""
        networks, hashes = self._other_networks(trainer, prompt)
        trained = prompt.lora_named(self.is_trained)
        te, unet = (trained.te, trained.unet) if trained else (0.0, 0.0)
        if trained_weight is not None:
            te = unet = trained_weight
        if trained and trained.dyn is not None:
            # a rank cut is a separate network over a copy of the current weights
            networks.insert(0, self._trained_copy(trainer, trained.dyn, te, unet))
            te = unet = 0.0
        trainer.network.set_multipliers(unet=unet, te=te)
        with attached(networks):
            image = self._sample(trainer.backbone, prompt)
        return image, hashes

    def _sample(self, backbone: DiffusionBackbone, prompt: PreviewPrompt) -> torch.Tensor:
        settings = self.settings_for(prompt)
        cond = backbone.encode_text([prompt.text])
        uncond = backbone.encode_text([self.negative_for(prompt)]) if settings.cfg_scale != 1 else None
        return render_image(backbone, cond, uncond, settings)

    def _other_networks(self, trainer, prompt: PreviewPrompt):
        """The networks of the other LoRAs a prompt names, multipliers set; a LoRA named twice
        counts once, at its last weights."""
        chosen = {}
        for tag in prompt.loras:
            if not self.is_trained(tag):
                entry = self.library.resolve(tag.name, tag.text)
                chosen[entry.path] = (tag, entry)
        networks, hashes = [], {}
        for path, (tag, entry) in chosen.items():
            network = self.cache.get(path, self._targets(trainer.backbone), trainer.backbone.device,
                                     tag.dyn, warn=trainer.say)
            network.set_multipliers(unet=tag.unet, te=tag.te)
            networks.append(network)
            hashes[tag.name] = entry.metadata.get("sshs_model_hash", "")[:12]
        return networks, hashes

    def _targets(self, backbone: DiffusionBackbone):
        """The model's LoRA-able layers, listed once per previewer (a walk over every module)."""
        if self._target_list is None:
            self._target_list = backbone.lora_targets()
        return self._target_list

    def _trained_copy(self, trainer, dyn: int, te: float, unet: float):
        tensors = network_tensors(trainer.network, "fp32")
        network, _ = build_network(self._targets(trainer.backbone), tensors, trainer.backbone.device, dyn)
        network.set_multipliers(unet=unet, te=te)
        return network

    # ---- weight sweep -------------------------------------------------------------------------------
    def _render_sweep(self, trainer, step: int, folder: Path) -> list[Path]:
        if not self.prompts:
            return []
        prompt, weights = self.prompts[0], self.cfg.preview_weight_sweep
        try:
            images = [self.render_prompt(trainer, prompt, trained_weight=w)[0] for w in weights]
        except (LoraNotFoundError, LoraFileError) as error:
            trainer.say(f"Weight sweep skipped: {error}")
            return []
        sheet = grid(images, columns=len(images), labels=[f"weight {w:g}" for w in weights])
        info = self.infotext(trainer, prompt, step, {}) + \
            f", Weight sweep: \"{', '.join(f'{w:g}' for w in weights)}\""
        return [save_png(folder / "sweep.png", sheet, info)]

    # ---- infotext -----------------------------------------------------------------------------------
    def infotext(self, trainer, prompt: PreviewPrompt, step: int, lora_hashes: dict) -> str:
        """The WebUI's generation-parameters text, so PNG Info / "send to txt2img" work on it.
        `{name}` is written as the LoRA's file name, which is what the WebUI will know it by."""
        settings = self.settings_for(prompt)
        identity = trainer.backbone.identity()
        fields = {
            "Steps": settings.steps, "Sampler": SAMPLER_LABELS[settings.sampler],
            "CFG scale": settings.cfg_scale, "Seed": settings.seed,
            "Size": f"{settings.width}x{settings.height}",
            "Model hash": str(identity.get("hash", ""))[:10] or None,
            "Model": Path(str(identity.get("source", ""))).stem or None,
            "Lora hashes": ", ".join(f"{k}: {v}" for k, v in lora_hashes.items() if v) or None,
            "Training LoRA": self.cfg.output_name, "Training step": step,
        }
        lines = [prompt.prompt.replace(TRAINED_PLACEHOLDER, self.cfg.output_name)]
        negative = self.negative_for(prompt)
        if negative:
            lines.append(f"Negative prompt: {negative}")
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
        return "\n".join(lines)


def quote(value) -> str:
    """The WebUI's infotext quoting: values with ',', ':' or newlines become JSON strings."""
    text = str(value)
    if not any(c in text for c in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)
