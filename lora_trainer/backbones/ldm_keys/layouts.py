"""Family layouts as data: where each component lives in a single-file checkpoint (what each text
encoder is comes from the family table, diffusion.families)."""

from __future__ import annotations

from dataclasses import dataclass

from ...diffusion.families import FAMILIES

# ---------------------------------------------------------------------------------------------
# Family layouts (data)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder inside a single-file checkpoint."""

    component: str  # the diffusers component it becomes: "text_encoder" or "text_encoder_2"
    prefix: str  # where its keys live in the single file
    # the family row's CLIP kind: OPENAI_CLIP, a transformers CLIPTextModel state dict under the
    # prefix (SD1, SDXL's first embedder); OPEN_CLIP, an open_clip text tower (SD2, SDXL's second
    # embedder), converted to/from transformers' CLIPTextModel(WithProjection) layout.
    clip_kind: str
    # SD2: the WebUI runs the OpenCLIP tower up to its *penultimate* resblock (then ln_final), so
    # diffusers ships SD2's text encoder with 23 of the file's 24 layers. The checkpoint's last
    # resblock (and its text_projection, which only the dropped pooled path uses) is therefore
    # surplus on import: kept aside as "extras" (see ``SplitCheckpoint``), never an error.
    drops_last_layer: bool = False


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component lives inside a single-file checkpoint of one model family."""

    family: str
    unet_prefix: str
    vae_prefix: str
    text_encoders: tuple[TextEncoderSlot, ...]
    # Keys real checkpoints carry that are not weights of the models (noise schedule
    # buffers, EMA copies, ...): skipped on import instead of being reported as unknown.
    ignored_prefixes: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()

    @property
    def text_encoder_prefix(self) -> str:
        return self.text_encoders[0].prefix

    def slot(self, component: str) -> TextEncoderSlot:
        for slot in self.text_encoders:
            if slot.component == component:
                return slot
        raise KeyError(f"the {self.family} layout has no {component}")


def _slot(family: str, index: int, component: str, prefix: str, drops_last_layer: bool = False) -> TextEncoderSlot:
    """Text encoder `index` of `family`, at `prefix` in the file, of the kind its family row says."""
    return TextEncoderSlot(component, prefix, FAMILIES[family].text_encoders[index], drops_last_layer)


_LDM_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)

SD1_LAYOUT = CheckpointLayout(
    family="sd1",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoders=(_slot("sd1", 0, "text_encoder", "cond_stage_model.transformer."),),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    ignored_keys=_LDM_SCHEDULE_BUFFERS,
)

SD2_LAYOUT = CheckpointLayout(
    family="sd2",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoders=(_slot("sd2", 0, "text_encoder", "cond_stage_model.model.", drops_last_layer=True),),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    ignored_keys=_LDM_SCHEDULE_BUFFERS,
)

SDXL_LAYOUT = CheckpointLayout(
    family="sdxl",
    unet_prefix="model.diffusion_model.",
    vae_prefix="first_stage_model.",
    text_encoders=(
        _slot("sdxl", 0, "text_encoder", "conditioner.embedders.0.transformer."),
        _slot("sdxl", 1, "text_encoder_2", "conditioner.embedders.1.model."),
    ),
    ignored_prefixes=("model_ema.", "first_stage_model.loss."),
    # SGM's DiffusionEngine keeps its discretisation as a buffer: a state_dict() of the live
    # model (what a WebUI/SGM "save" writes) has it.
    ignored_keys=_LDM_SCHEDULE_BUFFERS + ("denoiser.sigmas",),
)

LAYOUTS = {"sd1": SD1_LAYOUT, "sd2": SD2_LAYOUT, "sdxl": SDXL_LAYOUT}


def layout_for(family: str) -> CheckpointLayout:
    """The layout of ``family`` ("sd1", "sd2", "sd2-v", "sdxl"; v-prediction does not change keys)."""
    key = "sd2" if family in ("sd2-v", "sd2_v") else family
    if key not in LAYOUTS:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[key]


# The text encoder's position_ids is a buffer: real SD1 checkpoints carry it, transformers
# >= 4.31 no longer saves it. Written on export for fidelity, dropped on import.
_CLIP_POSITION_IDS = "text_model.embeddings.position_ids"


class CheckpointKeyError(KeyError):
    """A state dict has keys the layout does not know, or lacks keys it needs."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else ""


def _raise_on_mismatch(what: str, side: str, unknown: list[str], missing: list[str]) -> None:
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown {side} {what} keys: {_preview(unknown)}")
    if missing:
        problems.append(f"{len(missing)} {what} modules missing (no keys under): {_preview(missing)}")
    if problems:
        raise CheckpointKeyError("; ".join(problems) + " -- does the config match the weights?")


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
