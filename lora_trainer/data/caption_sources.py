"""Where an image's caption comes from: its sidecar file (`a.png` + `a.txt`) or a row of
metadata.csv (`file_name,text`). CSV captions win over sidecars; images the CSV does not list fall
back to their sidecar. Every bad CSV row is collected into one DataError, so a user fixes the file
in one go.
"""
from __future__ import annotations

import codecs
import csv
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .dataset_index import DataError, ImageRecord, _accepted_extensions, _some_names
from .images import SUPPORTED_EXTENSIONS

METADATA_FILE_NAME = "metadata.csv"


# ---- captions ------------------------------------------------------------------------------------

def _normalise_caption(text: str) -> str:
    # Multi-line captions are joined with ", " so each line stays a separate unit for tag
    # shuffling (tag-per-line files) and sentences stay readable (caption-per-line files).
    lines = [line.strip().strip(",").strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _decode_caption(data: bytes, path: Path, warnings: List[str]) -> str:
    # Windows Notepad saves "Unicode" as UTF-16 with a BOM and "ANSI" as cp1252; both are common
    # in hand-written caption files, so read them instead of failing on a byte we cannot decode.
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")  # "-sig" drops the BOM some editors write
    except UnicodeDecodeError:
        warnings.append(f"Caption file '{path}' is not UTF-8; read it as Windows-1252. Re-save it "
                        "as UTF-8 if any characters look wrong.")
        return data.decode("cp1252", errors="replace")


def _read_sidecar(image_path: Path, caption_extension: str,
                  warnings: List[str]) -> Optional[str]:
    """The caption from `image.<caption_extension>`, or None if there is no such file."""
    caption_path = image_path.with_suffix(caption_extension)
    try:
        data = caption_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.append(f"Could not read caption file '{caption_path}': {exc.strerror or exc}; "
                        "the image trains with an empty caption.")
        return None
    return _normalise_caption(_decode_caption(data, caption_path, warnings))


def _warn_missing_captions(records: List[ImageRecord], caption_extension: str,
                           csv_path: Optional[Path], warnings: List[str]) -> None:
    missing = [r.rel_path for r in records if r.caption_source == "none"]
    empty = [r.rel_path for r in records if r.caption_source != "none" and not r.caption]
    if missing:
        sources = f"no {caption_extension} file" + (" and no metadata.csv row" if csv_path else "")
        warnings.append(f"{len(missing)} image(s) have no caption ({sources}) and train with an "
                        f"empty caption: {_some_names(missing)}")
    if empty:
        warnings.append(f"{len(empty)} image(s) have an empty caption: {_some_names(empty)}")


# ---- metadata.csv --------------------------------------------------------------------------------

def _find_metadata_csv(root: Path, metadata_path) -> Optional[Path]:
    if metadata_path:
        path = Path(os.path.abspath(os.path.expanduser(str(metadata_path))))
        if not path.is_file():
            raise DataError(f"metadata_path '{path}' does not exist (or is not a file).")
        return path
    default = root / METADATA_FILE_NAME
    return default if default.is_file() else None


def _metadata_columns(header: Optional[List[str]], csv_path: Path) -> Tuple[int, int]:
    names = [cell.strip().lower() for cell in (header or [])]
    text_column = next((name for name in ("text", "caption") if name in names), None)
    if "file_name" not in names or text_column is None:
        # which columns are missing, never the line itself: metadata_path can name any file a
        # request may read, and the error goes back to whoever sent it (docs/security.md)
        missing = [c for c, ok in (("file_name", "file_name" in names), ("text", text_column)) if not ok]
        found = f"no {' and no '.join(repr(c) for c in missing)} column" if header else "an empty file"
        raise DataError(f"'{csv_path}' must start with a header row 'file_name,text' "
                        f"(found: {found} in {len(names)} column(s)).")
    return names.index("file_name"), names.index(text_column)


def _resolve_listed_file(file_name: str, root: Path, csv_dir: Path) -> Optional[Path]:
    # Backslashes: CSVs written on Windows ("sub\a.png"). Tried second because on POSIX a
    # backslash is a legal (if unlikely) file-name character.
    spellings = [file_name] + ([file_name.replace("\\", "/")] if "\\" in file_name else [])
    for spelling in spellings:
        for base in (root, csv_dir):
            candidate = base / spelling  # an absolute file_name replaces `base`
            if candidate.is_file():
                return Path(os.path.abspath(candidate))
    return None


def _relative_to_root(path: Path, root: Path) -> Optional[str]:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def _read_csv_rows(csv_path: Path) -> Tuple[Optional[List[str]], List[Tuple[int, List[str]]]]:
    """(header, [(first line of the row, row), ...]) with blank rows dropped. A malformed file
    (a quote left open, a row with more or fewer cells than the header) is a DataError naming the
    line: read leniently, it would silently turn the next rows into one caption."""
    rows: List[Tuple[int, List[str]]] = []
    start = 1  # first line of the row being read
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            # strict: a quote left open to the end of the file, or text after a closing quote,
            # is an error instead of a guess
            reader = csv.reader(handle, strict=True)
            header = next(reader, None)
            start = reader.line_num + 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append((start, row))
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise DataError(f"'{csv_path}' is not UTF-8 text ({exc}); re-save it as UTF-8.") from exc
    except csv.Error as exc:
        raise DataError(f"'{csv_path}' line {start}: not valid CSV ({exc}); is a double quote left "
                        "open in this row?") from exc
    problems = [problem for line, row in rows for problem in _row_shape_problems(csv_path, line, row, header)]
    if problems:
        raise DataError(f"{len(problems)} malformed row(s) in '{csv_path}':\n  " + "\n  ".join(problems),
                        problems)
    return header, rows


# a line inside a quoted caption that looks like a row of its own: "<image file>,..."
_SWALLOWED_ROW = re.compile(r"^\s*\"?[^,\"]+(" + "|".join(re.escape(e) for e in sorted(SUPPORTED_EXTENSIONS))
                            + r")\"?\s*,", re.IGNORECASE)


def _row_shape_problems(csv_path: Path, line: int, row: List[str], header: Optional[List[str]]) -> List[str]:
    where = f"{csv_path.name} line {line}"
    problems = []
    if header and len(row) != len(header):
        problems.append(f"{where}: {len(row)} cells, but the header has {len(header)} (a caption that "
                        "contains a comma must be in double quotes)")
    for cell in row:
        swallowed = [text for text in cell.splitlines()[1:] if _SWALLOWED_ROW.match(text)]
        if swallowed:
            problems.append(f"{where}: a quoted cell runs on over {len(swallowed)} line(s) that look like "
                            f"rows of their own (e.g. '{swallowed[0].strip()[:60]}'); a closing double "
                            "quote is missing")
            break
    return problems


def _read_metadata_csv(csv_path: Path, root: Path,
                       warnings: List[str]) -> Dict[str, Tuple[Path, str]]:
    """{rel_path: (path, caption)} for every row; all bad rows are reported in one DataError."""
    header, rows = _read_csv_rows(csv_path)
    file_column, text_column = _metadata_columns(header, csv_path)
    entries: Dict[str, Tuple[Path, str]] = {}
    first_line_of: Dict[str, int] = {}
    problems: List[str] = []
    for row_number, (line, row) in enumerate(rows, start=1):
        where = f"{csv_path.name} row {row_number} (line {line})"
        file_name = row[file_column].strip() if len(row) > file_column else ""
        caption = row[text_column] if len(row) > text_column else ""
        if not file_name:
            problems.append(f"{where}: empty file_name")
            continue
        path = _resolve_listed_file(file_name, root, csv_path.parent)
        if path is None:
            problems.append(f"{where}: file '{file_name}' not found (looked in '{root}'"
                            + (f" and '{csv_path.parent}')" if csv_path.parent != root else ")"))
            continue
        rel_path = _relative_to_root(path, root)
        if rel_path is None:
            problems.append(f"{where}: file '{file_name}' is outside train_data_dir '{root}'")
            continue
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            problems.append(f"{where}: file '{file_name}' is not a supported image "
                            f"(accepted: {_accepted_extensions()})")
            continue
        if rel_path in entries:
            warnings.append(f"{where}: '{rel_path}' is listed again (first on line "
                            f"{first_line_of[rel_path]}); using this later row's caption.")
        first_line_of.setdefault(rel_path, line)
        entries[rel_path] = (path, _normalise_caption(caption))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in '{csv_path}':\n  " + "\n  ".join(problems),
                        problems)
    return entries


# ---- which source wins ---------------------------------------------------------------------------

def _caption_for(rel_path: str, path: Path, csv_entries: Dict[str, Tuple[Path, str]],
                 caption_extension: str, warnings: List[str]) -> Tuple[str, str]:
    if rel_path in csv_entries:
        return csv_entries[rel_path][1], "csv"
    sidecar = _read_sidecar(path, caption_extension, warnings)
    if sidecar is not None:
        return sidecar, "sidecar"
    return "", "none"
