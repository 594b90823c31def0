"""The config schema as a form: one component per TrainConfig field, and the conversions between a
TrainConfig and the components' values.

The form holds exactly a config: `form_to_dict` gives the raw dict `run_config_from_dict` validates
(so the UI, the YAML files and the CLI share every rule and message), `config_to_values` fills
the form from a config. Component kinds, from the field metadata (config/schema.py):

    bool             -> Checkbox
    choices          -> Dropdown (optional ones get a "(default)" entry meaning null)
    int / float      -> Number (the range is in the info line; the config check reports it);
                        optional ones (empty = default) -> Textbox, because gradio 3.41's Number
                        cannot be empty (it shows and sends 0 for None)
    list             -> Textbox, one entry per line
    path / str       -> Textbox

Numbers get no gradio minimum/maximum on purpose: gradio rejects an out-of-range number before
the event runs, with a toast that names neither the field nor the other problems, whereas the
config check lists every problem next to the form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..app.run_config import run_config_from_dict
from ..config import GROUPS, REQUIRED_KEYS, ConfigError, FieldSpec, config_to_dict
from ..config.load import describe_range, field_specs

ELEM_PREFIX = "lora_trainer_"
DEFAULT_CHOICE = "(default)"

# Labels are the ui-config.json keys of the WebUI, so they must be unique in the tab; these read
# better than the generated ones (and keep "Resume" free for the runs list's button).
LABELS = {
    "train_data_dir": "Dataset folder",
    "metadata_path": "Captions metadata.csv",
    "caption_extension": "Caption file extension",
    "repeats": "Repeats per image",
    "resolution": "Resolution",
    "enable_bucket": "Aspect-ratio buckets",
    "min_bucket_reso": "Min bucket side",
    "max_bucket_reso": "Max bucket side",
    "bucket_reso_steps": "Bucket side step",
    "cache_latents_to_disk": "Cache latents on disk",
    "cache_dir": "Cache folder",
    "base_model": "Base model (folder or single file)",
    "base_model_config": "Base model config folder",
    "output_dir": "Output folder",
    "output_name": "LoRA name",
    "overwrite_output": "Replace a LoRA of that name another run wrote",
    "run_dir": "Run folder",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha",
    "init_lora_from": "Initial LoRA file",
    "adapter_type": "Adapter type (LoRA, LoCon, LoHa, LoKr)",
    "dora": "DoRA (weight-decomposed)",
    "lokr_factor": "LoKr factor (-1: automatic)",
    "learning_rate": "Learning rate",
    "text_encoder_lr": "Text encoder learning rate",
    "lr_scheduler": "LR scheduler",
    "lr_warmup_steps": "LR warm-up steps",
    "max_grad_norm": "Max gradient norm",
    "min_snr_gamma": "Min-SNR gamma",
    "save_steps": "Checkpoint every N steps",
    "keep_last_n_checkpoints": "Checkpoints to keep",
    "resume": "Resume from the last checkpoint",
    "preview_prompts": "Preview prompts (one per line)",
    "preview_weight_sweep": "Preview weight sweep (one per line)",
    "lora_dir": "Other LoRAs folder",
    "write_card": "Write WebUI card files",
    "num_threads": "CPU threads",
    "tensorboard": "TensorBoard events",
    "check_data": "Check the data before training",
}

_WORDS = {"lora": "LoRA", "lr": "LR", "te": "TE", "snr": "SNR", "cfg": "CFG", "n": "N"}


def label_for(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    words = [_WORDS.get(w, w) for w in name.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def elem_id(name: str) -> str:
    return ELEM_PREFIX + name


def kind_of(spec: FieldSpec) -> str:
    """"checkbox" | "dropdown" | "number" | "number_text" | "lines" | "path" | "text"."""
    if spec.kind == "bool":
        return "checkbox"
    if spec.meta.get("choices"):
        return "dropdown"
    if spec.kind in ("int", "float"):
        return "number_text" if spec.optional else "number"
    if spec.kind == "list":
        return "lines"
    if spec.meta.get("path"):
        return "path"
    return "text"


def info_for(spec: FieldSpec) -> str:
    parts = [spec.meta.get("help") or ""]
    if spec.kind in ("int", "float"):
        span = describe_range(spec.meta)
        if span:
            parts.append(f"Range: {span}.")
    if spec.optional and kind_of(spec) in ("number_text", "path", "text"):
        parts.append("Empty: default.")
    parts.append(f"[{spec.name}]")
    return " ".join(p for p in parts if p)


# ---- values: config <-> components ----------------------------------------------------------------

def to_component_value(spec: FieldSpec, value: Any) -> Any:
    """What the component shows for a config value."""
    kind = kind_of(spec)
    if kind == "checkbox":
        return bool(value)
    if kind == "dropdown":
        return DEFAULT_CHOICE if value is None else str(value)
    if kind == "number":
        return value
    if kind == "number_text":
        return "" if value is None else str(value)
    if kind == "lines":
        return "\n".join(str(item) for item in (value or []))
    return "" if value is None else str(value)


def _split_lines(text: str, commas: bool) -> list[str]:
    items: list[str] = []
    for line in str(text).splitlines():
        parts = line.split(",") if commas else [line]
        items.extend(part.strip() for part in parts if part.strip())
    return items


_OMIT = object()


def from_component_value(spec: FieldSpec, value: Any, required: Iterable[str] = ()) -> Any:
    """The raw config value (as YAML would give it) for a component value; `_OMIT` for "use the
    field's default". Validation is left to run_config_from_dict."""
    kind = kind_of(spec)
    if kind == "checkbox":
        return bool(value)
    if kind == "dropdown":
        if value in (None, "", DEFAULT_CHOICE):
            return None if spec.optional else _OMIT
        return value
    if kind == "number":
        if isinstance(value, float) and value.is_integer() and spec.kind == "int":
            return int(value)
        return value
    if kind == "lines":
        if isinstance(value, (list, tuple)):
            return list(value)
        return _split_lines(value or "", commas=spec.meta.get("item") == "float")
    text = "" if value is None else str(value)
    if kind == "path":
        text = text.strip()
        if not text:
            # a blank required path is reported as missing; a blank optional one means null; a
            # blank non-optional one that is not required here (base_model in the WebUI) keeps
            # its default rather than failing as "empty path"
            if spec.name in required:
                return ""
            return None if spec.optional else _OMIT
        return text
    if not text.strip() and spec.optional:
        return None
    return text


@dataclass
class Form:
    """The field components of one tab, in schema order."""
    components: dict          # field name -> gradio component
    required: tuple = tuple(REQUIRED_KEYS)

    @property
    def names(self) -> list[str]:
        return list(self.components)

    @property
    def inputs(self) -> list:
        return list(self.components.values())

    def to_dict(self, values: Sequence[Any]) -> dict:
        return form_to_dict(values, self.names, self.required)

    def to_config(self, values: Sequence[Any], base_dir, builder=None):
        raw = self.to_dict(values)
        if builder is not None:
            return builder(raw)
        return run_config_from_dict(raw, base_dir=base_dir, source="the form", required=self.required)


def form_to_dict(values: Sequence[Any], names: Sequence[str], required: Iterable[str] = ()) -> dict:
    specs = field_specs()
    required = tuple(required)
    if len(values) != len(names):
        raise ValueError(f"expected {len(names)} form values, got {len(values)}")
    out = {}
    for name, value in zip(names, values):
        raw = from_component_value(specs[name], value, required)
        if raw is not _OMIT:
            out[name] = raw
    return out


def config_to_values(cfg, names: Optional[Sequence[str]] = None) -> list:
    values = config_to_dict(cfg) if not isinstance(cfg, Mapping) else dict(cfg)
    specs = field_specs()
    names = list(names or specs)
    return [to_component_value(specs[n], values.get(n, specs[n].default)) for n in names]


def raw_to_values(raw: Mapping[str, Any], names: Optional[Sequence[str]] = None) -> list:
    """Form values for a raw (possibly invalid) mapping, e.g. a preset that does not validate:
    keys it lacks show their defaults, bad values are shown as written so they can be fixed."""
    specs = field_specs()
    names = list(names or specs)
    out = []
    for name in names:
        spec = specs[name]
        if name not in raw:
            out.append(to_component_value(spec, spec.default))
            continue
        value = raw[name]
        kind = kind_of(spec)
        if kind == "number" and not (value is None or isinstance(value, (int, float))
                                     and not isinstance(value, bool)):
            try:
                value = float(str(value).strip())
                value = value if math.isfinite(value) else None
            except ValueError:
                value = None
        if kind == "lines" and not isinstance(value, (list, tuple)):
            value = [] if value is None else [value]
        if kind == "checkbox" and not isinstance(value, bool):
            value = str(value).strip().lower() in ("true", "yes", "on", "1")
        out.append(to_component_value(spec, value))
    return out


def number_step(spec: FieldSpec) -> float:
    if spec.kind == "int":
        return 1
    default = spec.default if isinstance(spec.default, (int, float)) else 0
    if default:
        return min(0.1, 10 ** math.floor(math.log10(abs(default))))
    return 0.01


# ---- building ----------------------------------------------------------------------------------------

def make_component(spec: FieldSpec, value: Any):
    """One gradio component for a field (call inside a Blocks context)."""
    import gradio as gr

    from . import compat

    common = dict(label=label_for(spec.name), info=info_for(spec), elem_id=elem_id(spec.name),
                  elem_classes=["lora-trainer-field"])
    kind = kind_of(spec)
    shown = to_component_value(spec, value)
    if kind == "checkbox":
        return compat.make(gr.Checkbox, value=shown, **common)
    if kind == "dropdown":
        choices = list(spec.meta["choices"])
        if spec.optional:
            choices = [DEFAULT_CHOICE, *choices]
        return compat.make(gr.Dropdown, choices=choices, value=shown, **common)
    if kind == "number":
        return compat.make(gr.Number, value=shown, step=number_step(spec), **common)
    if kind == "lines":
        return compat.make(gr.Textbox, value=shown, lines=3, max_lines=20, **common)
    placeholder = "default" if kind == "number_text" else None
    return compat.make(gr.Textbox, value=shown, lines=1, max_lines=1, placeholder=placeholder, **common)


def initial_values(defaults: Optional[Mapping[str, Any]] = None) -> dict:
    """Field values a fresh form shows: the schema defaults, then `defaults` (raw values as YAML
    would give them; unknown keys are ignored, bad values shown as written)."""
    specs = field_specs()
    values = {name: spec.default for name, spec in specs.items()}
    if defaults:
        known = {k: v for k, v in defaults.items() if k in specs}
        shown = raw_to_values(known, list(known))
        for name, ui_value in zip(known, shown):
            values[name] = from_component_value(specs[name], ui_value)
            if values[name] is _OMIT:
                values[name] = specs[name].default
    return values


def build_form(defaults: Optional[Mapping[str, Any]] = None, required: Iterable[str] = tuple(REQUIRED_KEYS),
               groups: Sequence[str] = GROUPS) -> Form:
    """All field components grouped by `schema.GROUPS`, each group in an open Accordion with its
    advanced fields folded in a closed one ("Advanced" itself is closed). Call inside a Blocks."""
    import gradio as gr

    specs = field_specs()
    values = initial_values(defaults)
    by_group: dict[str, list[FieldSpec]] = {g: [] for g in groups}
    for spec in specs.values():
        by_group.setdefault(spec.meta["group"], []).append(spec)
    components: dict[str, Any] = {}   # field name -> gradio component
    for group, members in by_group.items():
        if not members:
            continue
        basic = [s for s in members if not s.meta.get("advanced")]
        advanced = [s for s in members if s.meta.get("advanced")]
        gid = group.lower().replace("/", "_").replace(" ", "_")
        with gr.Accordion(group, open=bool(basic), elem_id=f"{ELEM_PREFIX}group_{gid}"):
            _add_rows(basic, values, components)
            if advanced and basic:
                with gr.Accordion(f"More {group} settings", open=False,
                                  elem_id=f"{ELEM_PREFIX}group_{gid}_advanced"):
                    _add_rows(advanced, values, components)
            else:
                _add_rows(advanced, values, components)
    ordered = {name: components[name] for name in specs if name in components}
    return Form(ordered, tuple(required))


def _rows(specs: Sequence[FieldSpec]) -> list[list[FieldSpec]]:
    """Two fields per row; multi-line fields get a row of their own."""
    rows: list[list[FieldSpec]] = []
    pending: list[FieldSpec] = []
    for spec in specs:
        if kind_of(spec) == "lines":
            if pending:
                rows.append(pending)
                pending = []
            rows.append([spec])
            continue
        pending.append(spec)
        if len(pending) == 2:
            rows.append(pending)
            pending = []
    if pending:
        rows.append(pending)
    return rows


def _add_rows(specs: Sequence[FieldSpec], values: Mapping[str, Any], components: dict) -> None:
    import gradio as gr

    for row in _rows(specs):
        with gr.Row():
            for spec in row:
                components[spec.name] = make_component(spec, values[spec.name])


def problems_of(error: ConfigError) -> list[tuple[str, str]]:
    """(label, message) for each problem of a ConfigError, labels as the form shows them."""
    specs = field_specs()
    out = []
    for key, message in error.problems:
        label = f"{label_for(key)} ({key})" if key in specs else key
        out.append((label, message))
    return out
