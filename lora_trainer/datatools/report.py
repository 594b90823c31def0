"""The check-data report: a terminal table, report.json (for tools) and a self-contained
report.html (thumbnails embedded as base64, so it can be mailed or opened anywhere)."""
from __future__ import annotations

import base64
import html
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

from .findings import ERROR, INFO, SEVERITIES, WARNING, Finding
from .full_check import CheckResult

REPORT_FORMAT = "lora_trainer.data_report.v1"
ROWS_PER_CHECK = 8       # terminal: more rows of one check collapse into "... and N more"
_FILE_COLUMN = 36


# ---- terminal ------------------------------------------------------------------------------------

def format_table(result: CheckResult) -> str:
    problems = [f for f in result.findings if f.severity != INFO]
    lines = [f"Dataset check of {result.root}: {result.summary['images']} images in "
             f"{result.elapsed_s:.1f} s"]
    if problems:
        lines.append(f"{'SEVERITY':8}  {'CHECK':18}  {'FILE':{_FILE_COLUMN}}  MESSAGE")
        lines += _problem_rows(problems)
    counts = Counter(f.severity for f in result.findings)
    lines.append(f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s).")
    lines += [f"  {f.message}" for f in result.findings if f.severity == INFO]
    return "\n".join(lines)


def _problem_rows(problems: List[Finding]) -> List[str]:
    rows: List[str] = []
    shown: Dict[str, int] = Counter()
    hidden: Dict[str, int] = Counter()
    for finding in problems:
        if shown[finding.code] >= ROWS_PER_CHECK:
            hidden[finding.code] += 1
            continue
        shown[finding.code] += 1
        rows.append(f"{finding.severity:8}  {finding.code:18}  {_files_cell(finding.files)}  "
                    f"{finding.message}")
    rows += [f"{'':8}  {code:18}  ... and {count} more (see report.json / report.html)"
             for code, count in hidden.items()]
    return rows


def _files_cell(files: List[str]) -> str:
    text = ", ".join(files) if files else "-"
    if len(text) > _FILE_COLUMN:
        text = "..." + text[-(_FILE_COLUMN - 3):]  # the file name is at the end; keep it
    return f"{text:{_FILE_COLUMN}}"


# ---- JSON ----------------------------------------------------------------------------------------

def report_dict(result: CheckResult) -> dict:
    counts = Counter(f.severity for f in result.findings)
    return {
        "format": REPORT_FORMAT,
        "root": result.root,
        "options": asdict(result.options),
        "counts": {severity: counts[severity] for severity in SEVERITIES},
        "summary": result.summary,
        "findings": [f.to_dict() for f in result.findings],
        "images": [_image_dict(image) for image in result.images],
        "elapsed_s": round(result.elapsed_s, 3),
    }


def _image_dict(image) -> dict:
    values = asdict(image)
    values.pop("thumbnail")
    values["bucket"] = f"{image.bucket[0]}x{image.bucket[1]}" if image.bucket else None
    return values


def write_reports(result: CheckResult, out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "html": out / "report.html"}
    _write_atomic(paths["json"], json.dumps(report_dict(result), indent=2, ensure_ascii=False))
    _write_atomic(paths["html"], render_html(result))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    # A viewer with the old report open never sees a half-written file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# ---- HTML ----------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.error{background:#fdd}.warning{background:#ffe9b3}.info{background:#eef}
.thumbs img{height:72px;margin:2px;border:1px solid #999}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
.card{width:180px;font-size:12px;border:1px solid #ddd;padding:4px}
.card img{max-width:170px;max-height:112px;display:block;margin:auto}
.caption{color:#555;word-break:break-word}
"""


def render_html(result: CheckResult) -> str:
    thumbs = {image.rel_path: image.thumbnail for image in result.images if image.thumbnail}
    counts = Counter(f.severity for f in result.findings)
    parts = [f"<!doctype html><meta charset='utf-8'><title>Dataset check</title><style>{_STYLE}</style>",
             f"<h1>Dataset check</h1><p><code>{_e(result.root)}</code>: {result.summary['images']} "
             f"images, {counts[ERROR]} error(s), {counts[WARNING]} warning(s).</p>",
             _summary_html(result.summary), _findings_html(result.findings, thumbs),
             _gallery_html(result)]
    return "\n".join(parts)


def _summary_html(summary: dict) -> str:
    rows = [("Images", summary["images"]), ("Samples per epoch", summary["epoch_size"]),
            ("Resolution", summary["resolution"])]
    rows += [(f"Folder {f['folder']}", f"{f['images']} images x {f['repeats']} = {f['samples']}")
             for f in summary["folders"]]
    rows += [("Buckets", ", ".join(f"{b['bucket']}: {b['images']}" for b in summary["buckets"])),
             ("Caption tokens", "max {max}, mean {mean}, over 75: {over_window}".format(
                 **summary["caption_tokens"])),
             ("Top tags", ", ".join(f"{t} ({n})" for t, n in summary["top_tags"]))]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>Summary</h2><table>{body}</table>"


def _findings_html(findings: List[Finding], thumbs: Dict[str, bytes]) -> str:
    grouped = defaultdict(list)
    for finding in findings:
        if finding.severity != INFO:
            grouped[finding.severity].append(finding)
    if not grouped:
        return "<h2>Findings</h2><p>No problems found.</p>"
    rows = []
    for severity in (ERROR, WARNING):
        for f in grouped[severity]:
            images = "".join(_img(thumbs.get(path), path) for path in f.files)
            rows.append(f"<tr class='{severity}'><td>{severity}</td><td>{_e(f.code)}</td>"
                        f"<td>{'<br>'.join(_e(p) for p in f.files)}<div class='thumbs'>{images}</div></td>"
                        f"<td>{_e(f.message)}</td></tr>")
    header = "<tr><th>Severity</th><th>Check</th><th>Files</th><th>Message</th></tr>"
    return f"<h2>Findings</h2><table>{header}{''.join(rows)}</table>"


def _gallery_html(result: CheckResult) -> str:
    cards = []
    for image in result.images:
        bucket = f"{image.bucket[0]}x{image.bucket[1]}" if image.bucket else "-"
        cards.append(f"<div class='card'>{_img(image.thumbnail, image.rel_path)}<b>{_e(image.rel_path)}</b>"
                     f"<br>{image.width}x{image.height} &rarr; {bucket}, x{image.repeats}"
                     f"<br>{image.caption_tokens if image.caption_tokens is not None else '?'} tokens, "
                     f"sharpness {image.sharpness:.0f}<div class='caption'>{_e(image.caption)}</div></div>")
    return f"<h2>All images</h2><div class='gallery'>{''.join(cards)}</div>"


def _img(jpeg, title: str) -> str:
    if not jpeg:
        return ""
    data = base64.b64encode(jpeg).decode("ascii")
    return f"<img src='data:image/jpeg;base64,{data}' title='{_e(title)}' alt=''>"


def _e(value) -> str:
    return html.escape(str(value), quote=True)
