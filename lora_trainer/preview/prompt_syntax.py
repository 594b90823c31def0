"""Preview prompt lines: the WebUI's extra-network tags plus kohya's inline options.

One line may read
    a photo of lt_demo <lora:{name}:0.7> <lora:style:0.5:1> --n blurry --w 512 --h 768 --s 20 --l 7 --d 5

Tags follow the WebUI exactly (modules/extra_networks.py + the Lora handler): the generic tag regex
`<(\\w+):([^>]+)>`, arguments split on ':', an argument holding '=' is named, the rest positional;
for `lora` (alias `lyco`): name, te (default 1), unet (default te), dyn; `te=`, `unet=`, `dyn=`
override the positional ones. Every tag is cut out of the text the text encoder sees, as the WebUI
does (it leaves the surrounding spaces alone; CLIP's tokenizer ignores them anyway).

kohya's options (`--n` negative, `--w`/`--h` size, `--s` steps, `--l` CFG, `--d` seed, `--ss`
sampler) follow the prompt after " --", so kohya prompt files work unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# The WebUI's own pattern: a tag kind made of word characters, then anything up to '>'.
TAG_PATTERN = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_KINDS = ("lora", "lyco")
# `<lora:{name}:w>` always means the LoRA being trained, whatever output_name is.
TRAINED_PLACEHOLDER = "{name}"

# kohya's sampler names -> ours; anything else falls back to the configured sampler (with a note),
# because a kohya prompt file must still render.
KOHYA_SAMPLERS = {"euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
                  "ddim": "ddim"}


class PromptSyntaxError(ValueError):
    """A prompt line that cannot be rendered; the message names the offending tag or option."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float
    dyn: int | None
    text: str              # the tag as written, for messages

    def refers_to_trained(self, output_name: str) -> bool:
        return self.name in (TRAINED_PLACEHOLDER, output_name)


@dataclass
class PreviewPrompt:
    line: str                          # the line as configured (shown in the PNG infotext)
    prompt: str                        # the line without options: what the WebUI infotext shows
    text: str                          # prompt with every tag removed: what the text encoder sees
    loras: list[LoraTag] = field(default_factory=list)
    negative: str | None = None        # None: use the configured default
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    notes: list[str] = field(default_factory=list)   # harmless oddities worth telling the user

    def lora_named(self, predicate) -> LoraTag | None:
        """The last matching tag: with a LoRA named twice, the later weight wins."""
        found = [tag for tag in self.loras if predicate(tag)]
        return found[-1] if found else None


# ---- tags -------------------------------------------------------------------------------------------

def _split_arguments(arguments: str) -> tuple[list[str], dict[str, str]]:
    """The WebUI's ExtraNetworkParams: 'a=b' is named, anything else (also 'a=b=c') positional."""
    positional, named = [], {}
    for item in arguments.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    return positional, named


def _number(value: str, convert, what: str, tag: str):
    try:
        return convert(value)
    except ValueError:
        raise PromptSyntaxError(f"{tag}: the {what} {value!r} is not a number "
                                f"(write e.g. <lora:name:0.7>)") from None


def parse_lora_tag(arguments: str, tag: str) -> LoraTag:
    positional, named = _split_arguments(arguments)
    name = positional[0] if positional else ""
    if not name.strip():
        raise PromptSyntaxError(f"{tag}: the LoRA name is empty (write e.g. <lora:name:0.7>)")
    te = _number(positional[1], float, "text-encoder weight", tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], float, "te= weight", tag) if "te" in named else te
    # the UNet weight defaults to the text-encoder weight *after* te= is applied, as in the WebUI
    unet = _number(positional[2], float, "UNet weight", tag) if len(positional) > 2 else te
    unet = _number(named["unet"], float, "unet= weight", tag) if "unet" in named else unet
    dyn = _number(positional[3], int, "dyn rank", tag) if len(positional) > 3 else None
    dyn = _number(named["dyn"], int, "dyn= rank", tag) if "dyn" in named else dyn
    if dyn is not None and dyn < 1:
        raise PromptSyntaxError(f"{tag}: dyn must be a rank of at least 1, got {dyn}")
    return LoraTag(name, te, unet, dyn, tag)


def extract_tags(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """(text without tags, LoRA tags, notes about tags of other kinds, which are dropped)."""
    loras, notes = [], []

    def take(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind in LORA_TAG_KINDS:
            loras.append(parse_lora_tag(arguments, match.group(0)))
        else:
            notes.append(f"{match.group(0)}: '{kind}' networks are not rendered in previews; "
                         "the tag is ignored")
        return ""

    return TAG_PATTERN.sub(take, prompt), loras, notes


# ---- kohya options --------------------------------------------------------------------------------

def _option_value(option: str, value: str, convert, line: str):
    try:
        return convert(value.strip())
    except ValueError:
        raise PromptSyntaxError(f"--{option} {value.strip()!r} in prompt {line!r}: not a valid "
                                "number") from None


def _apply_option(prompt: PreviewPrompt, chunk: str, line: str) -> None:
    """One ` --x value` chunk. Letters are case-insensitive, as in kohya."""
    match = re.match(r"(\w+)\s*(.*)", chunk, re.DOTALL)
    if not match:
        prompt.notes.append(f"ignored the empty option '--{chunk}'")
        return
    option, value = match.group(1).lower(), match.group(2).strip()
    if option == "n":
        prompt.negative = value
    elif option in ("w", "h"):
        size = _option_value(option, value, int, line)
        if size < 64:   # (other sizes are rounded down to a multiple of 8 when rendering)
            raise PromptSyntaxError(f"--{option} {size} in prompt {line!r}: sizes must be at least 64")
        setattr(prompt, "width" if option == "w" else "height", size)
    elif option == "s":
        prompt.steps = _option_value(option, value, int, line)
        if prompt.steps < 1:
            raise PromptSyntaxError(f"--s {prompt.steps} in prompt {line!r}: needs at least 1 step")
    elif option == "l":
        prompt.cfg_scale = _option_value(option, value, float, line)
    elif option == "d":
        prompt.seed = _option_value(option, value, int, line)
    elif option == "ss":
        prompt.sampler = KOHYA_SAMPLERS.get(value.lower())
        if prompt.sampler is None:
            prompt.notes.append(f"--ss {value}: not a sampler previews have (euler, euler_a, ddim); "
                                "using the configured one")
    else:
        prompt.notes.append(f"--{option}: unknown kohya option, ignored")


def parse_prompt_line(line: str) -> PreviewPrompt:
    """Parse one preview prompt; raises PromptSyntaxError naming the bad tag or option."""
    head, *options = line.strip().split(" --")
    text, loras, notes = extract_tags(head)
    prompt = PreviewPrompt(line=line, prompt=head.strip(), text=text, loras=loras, notes=notes)
    for chunk in options:
        _apply_option(prompt, chunk, line)
    if prompt.negative is not None:
        # the WebUI strips tags from the negative prompt too; they do nothing there in a preview
        prompt.negative, negative_loras, negative_notes = extract_tags(prompt.negative)
        prompt.notes += negative_notes
        prompt.notes += [f"{tag.text} in the negative prompt: ignored" for tag in negative_loras]
    return prompt


def parse_prompt_lines(lines) -> list[PreviewPrompt]:
    """Configured prompts; blank lines and '#' comments (kohya prompt files) are skipped."""
    return [parse_prompt_line(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
