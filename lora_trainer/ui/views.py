"""What the page shows, as plain values (HTML strings, DataFrames, image lists): no gradio here, so
these are unit-testable and identical on every gradio version."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Optional

from ..config import ConfigError
from .fields import problems_of
from .worker import Snapshot

TAG_WEIGHT = 0.7


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def message_html(text: str = "", kind: str = "info") -> str:
    """kind: info | ok | warn | error. Empty text gives an empty (hidden by CSS) box."""
    if not text:
        return '<div class="lora-trainer-msg lora-trainer-msg-empty"></div>'
    body = "<br>".join(_esc(line) for line in str(text).splitlines())
    return f'<div class="lora-trainer-msg lora-trainer-msg-{kind}">{body}</div>'


def problems_html(error: ConfigError, heading: Optional[str] = None) -> str:
    """Every problem of a ConfigError as a list (no stack), with the form's labels."""
    problems = problems_of(error)
    count = len(problems)
    heading = heading or f"{count} problem{'s' if count != 1 else ''} in the settings:"
    items = "".join(f"<li><b>{_esc(label)}</b>: {_esc(message)}</li>" if label else
                    f"<li>{_esc(message)}</li>" for label, message in problems)
    return (f'<div class="lora-trainer-msg lora-trainer-msg-error" id="lora_trainer_problems">'
            f"<div>{_esc(heading)}</div><ul>{items}</ul></div>")


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


STATUS_TEXT = {
    "idle": "Idle",
    "starting": "Starting (loading data and model)",
    "training": "Training",
    "stopping": "Stopping after this step (a checkpoint is saved)",
    "finished": "Finished",
    "stopped": "Stopped",
    "error": "Failed",
}


def progress_html(snap: Snapshot) -> str:
    total = snap.total_steps
    fraction = (snap.step / total) if total else 0.0
    percent = max(0.0, min(100.0, 100.0 * fraction))
    parts = [f'<span class="lora-trainer-status" data-status="{_esc(snap.status)}">'
             f"{_esc(STATUS_TEXT.get(snap.status, snap.status))}</span>"]
    if total:
        parts.append(f'<span class="lora-trainer-steps">step {snap.step}/{total}</span>')
    if snap.it_per_s:
        speed = f"{snap.it_per_s:.2f} it/s" if snap.it_per_s >= 1 else f"{1 / snap.it_per_s:.2f} s/it"
        parts.append(f"<span>{speed}</span>")
    if snap.active and snap.eta_s is not None:
        parts.append(f"<span>ETA {_clock(snap.eta_s)}</span>")
    if snap.elapsed_s:
        parts.append(f"<span>elapsed {_clock(snap.elapsed_s)}</span>")
    if snap.loss is not None:
        parts.append(f"<span>loss {snap.loss:.4f}</span>")
    bar_class = "lora-trainer-bar-fill" + (" lora-trainer-bar-active" if snap.active else "")
    return (f'<div class="lora-trainer-progress" data-step="{snap.step}" data-total="{total}" '
            f'data-status="{_esc(snap.status)}" data-run="{_esc(snap.output_name or "")}" '
            f'data-ended="{snap.ended_wall or ""}">'
            f'<div class="lora-trainer-bar"><div class="{bar_class}" style="width:{percent:.1f}%"></div></div>'
            f'<div class="lora-trainer-progress-text">{" · ".join(parts)}</div></div>')


def loss_frame(snap: Snapshot):
    """The loss curve as a DataFrame (step, loss), or None before the first step."""
    if not snap.losses:
        return None
    import pandas as pd

    steps, losses = zip(*snap.losses)
    return pd.DataFrame({"step": list(steps), "loss": list(losses)})


def gallery_items(previews: Iterable) -> list:
    """(PIL image, caption) pairs. Images are handed over as pixels, not paths: gradio 4+ only
    serves files from allowed folders, and the run folder can be anywhere."""
    from PIL import Image

    items = []
    for path, caption in previews:
        try:
            with Image.open(path) as image:
                items.append((image.convert("RGB"), f"{caption}: {Path(path).name}"))
        except OSError:
            continue
    return items


def log_text(snap: Snapshot, lines: int = 80) -> str:
    return "\n".join(snap.log_lines[-lines:])


def lora_tag(name: Optional[str], weight: float = TAG_WEIGHT) -> str:
    return f"<lora:{name}:{weight:g}>" if name else ""


def result_values(snap: Snapshot) -> tuple[str, str]:
    """(LoRA path, prompt tag) once a run finished; empty while training or after a failure."""
    if snap.status != "finished" or not snap.lora_path:
        return "", ""
    return snap.lora_path, lora_tag(Path(snap.lora_path).stem)


def findings_html(result, limit: int = 40) -> str:
    """A data-check result (lora_trainer.datatools) as a short report."""
    findings = list(getattr(result, "findings", []) or [])
    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in ("error", "warning", "info")}
    kind = "error" if counts["error"] else ("warn" if counts["warning"] else "ok")
    head = (f"Data check of {_esc(getattr(result, 'root', ''))}: {counts['error']} error(s), "
            f"{counts['warning']} warning(s), {counts['info']} note(s).")
    order = {"error": 0, "warning": 1, "info": 2}
    items = []
    for f in sorted(findings, key=lambda f: order.get(f.severity, 3))[:limit]:
        files = getattr(f, "files", None) or []
        where = f" ({_esc(', '.join(files[:3]))}{', ...' if len(files) > 3 else ''})" if files else ""
        items.append(f'<li class="lora-trainer-finding-{_esc(f.severity)}"><b>{_esc(f.severity)}</b>: '
                     f"{_esc(f.message)}{where}</li>")
    more = f"<li>... {len(findings) - limit} more</li>" if len(findings) > limit else ""
    return (f'<div class="lora-trainer-msg lora-trainer-msg-{kind}" id="lora_trainer_data_report">'
            f"<div>{head}</div><ul>{''.join(items)}{more}</ul></div>")
