"""Reading causal-LM training data: a file or a folder of `.jsonl` and `.txt`.

A `.jsonl` line is one sample, in one of three shapes:
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
  {"prompt": ..., "completion": ...}
  {"text": ...}
A `.txt` file holds plain-text samples separated by blank lines. Every sample remembers its file and
line, so every later problem (template error, too long, nothing to learn) can name them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".jsonl", ".txt")


class LMDataError(ValueError):
    """A problem in the training data, naming the file and line."""


@dataclass(frozen=True)
class RawSample:
    source: str              # file path relative to the data root, and line: "chats.jsonl:12"
    kind: str                # "messages" | "prompt" | "text"
    messages: tuple = ()     # ((role, content), ...)
    prompt: str = ""
    completion: str = ""
    text: str = ""


def data_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise LMDataError(f"train_data_dir '{root}': a causal_lm data file must be .jsonl or .txt")
        return [root]
    if not root.is_dir():
        raise LMDataError(f"train_data_dir '{root}' does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise LMDataError(f"train_data_dir '{root}' holds no .jsonl or .txt files")
    return files


def collect_samples(root) -> tuple[list[RawSample], list[str]]:
    """(every readable sample, every problem as 'file:line: what'), in a fixed order: files sorted
    by path, then by line."""
    root = Path(root)
    samples: list[RawSample] = []
    problems: list[str] = []
    for path in data_files(root):
        name = path.name if root.is_file() else path.relative_to(root).as_posix()
        reader = _jsonl_samples if path.suffix.lower() == ".jsonl" else _txt_samples
        for item in reader(path, name):
            (problems if isinstance(item, str) else samples).append(item)
    return samples, problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LMDataError(f"{len(problems)} problem(s) in the training data:\n  - "
                          + "\n  - ".join(problems[:20]) + more)


def read_samples(root) -> list[RawSample]:
    """Every sample under `root`; all problems of all files are reported together."""
    samples, problems = collect_samples(root)
    raise_problems(problems)
    if not samples:
        raise LMDataError(f"train_data_dir '{root}' holds no samples")
    return samples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LMDataError(f"{path}: not UTF-8 text ({error})") from None


def _txt_samples(path: Path, name: str):
    lines = _read_text(path).splitlines()
    start, block = None, []
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            yield RawSample(f"{name}:{start}", "text", text="\n".join(block))
            start, block = None, []


def _jsonl_samples(path: Path, name: str):
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield f"{where}: not valid JSON ({error.msg} at column {error.colno})"
            continue
        try:
            yield _sample_from_row(row, where)
        except LMDataError as problem:
            yield f"{where}: {problem}"


def _text_field(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise LMDataError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _sample_from_row(row, where: str) -> RawSample:
    if not isinstance(row, dict):
        raise LMDataError(f"a line must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return RawSample(where, "messages", messages=_messages(row["messages"]))
    if "prompt" in row or "completion" in row:
        if "prompt" not in row or "completion" not in row:
            raise LMDataError("'prompt' and 'completion' go together; one of them is missing")
        return RawSample(where, "prompt", prompt=_text_field(row, "prompt"),
                         completion=_text_field(row, "completion"))
    if "text" in row:
        return RawSample(where, "text", text=_text_field(row, "text"))
    raise LMDataError("expected one of the keys 'messages', 'prompt'/'completion' or 'text', got "
                      + ", ".join(repr(k) for k in list(row)[:5]))


def _messages(value) -> tuple:
    if not isinstance(value, list) or not value:
        raise LMDataError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise LMDataError(f"message {i} is not an object")
        if "role" not in message:
            raise LMDataError(f"message {i} has no 'role' (one of {', '.join(ROLES)})")
        if message["role"] not in ROLES:
            raise LMDataError(f"message {i} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise LMDataError(f"message {i} has no text 'content'")
        out.append((message["role"], message["content"]))
    return tuple(out)
