"""The real CLIP tokenizer (as used by SD1's text encoder), built without a model hub.

open_clip ships OpenAI's CLIP BPE merge list (``bpe_simple_vocab_16e6.txt.gz``) inside its
package. The 49,408-entry CLIP vocabulary is a deterministic function of that file, so we derive
``vocab.json`` / ``merges.txt`` from it and let transformers load them like any hub tokenizer.

Only the data file is needed: open_clip itself is never imported (it imports torchvision).

transformers 5 trap: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores the
files and yields a 3-token vocabulary, so we always go through ``from_pretrained(folder)``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..storage.hashing import file_sha256

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses 49152 BPE tokens: 256 bytes + 256 bytes-with-</w> + the first 48,894 merges.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77

MISSING_BPE_MESSAGE = (
    f"The CLIP BPE file {BPE_FILE_NAME} was not found. It ships inside the open_clip package; "
    "install it without its (heavy) dependencies: pip install --no-deps open_clip_torch"
)

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# Locating and reading the BPE file
# ---------------------------------------------------------------------------------------------

def find_bpe_file() -> Path:
    """Path of open_clip's BPE file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(MISSING_BPE_MESSAGE)


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character table.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (control chars, space,
    ...) are shifted to code points 256+ so every byte has a visible, non-whitespace symbol.
    The insertion order (printable ranges first) defines the first 256 vocabulary ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def read_merges(bpe_path: Path) -> list[str]:
    """The merges CLIP actually uses: lines 1..48894 (line 0 is a version header)."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{bpe_path} holds {len(merges)} merges, expected {NUM_MERGES}")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id, in CLIP's order: bytes, bytes + '</w>', joined merges, then the specials."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge.split(" ")) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


# ---------------------------------------------------------------------------------------------
# Writing tokenizer folders
# ---------------------------------------------------------------------------------------------

def _tokenizer_config() -> dict:
    # Same settings as SD1's tokenizer/ folder: SD pads with <|endoftext|>, not a separate pad token.
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }


def _special_tokens_map() -> dict:
    return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}


def write_tokenizer_files(folder: str | os.PathLike, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs into ``folder`` (created if needed).

    The files are the classic slow-tokenizer layout, which both transformers 5 and the
    WebUI's transformers 4.30 load. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_merges(Path(bpe_path) if bpe_path else find_bpe_file())
    vocab = build_vocab(merges)
    _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_text(folder / "tokenizer_config.json", json.dumps(_tokenizer_config(), indent=2))
    _write_text(folder / "special_tokens_map.json", json.dumps(_special_tokens_map(), indent=2))
    return folder


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def default_cache_dir() -> Path:
    """Where generated tokenizer folders live unless the caller chooses: $LORA_TRAINER_CACHE or tmp."""
    base = os.environ.get("LORA_TRAINER_CACHE")
    return Path(base) if base else Path(tempfile.gettempdir()) / "lora_trainer_cache"


def cached_tokenizer_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A complete tokenizer folder for the installed BPE file, generated once and reused.

    Keyed by the BPE file's hash so a different open_clip version never reuses stale files.
    Generated in a private temp folder and renamed into place, so concurrent processes never
    see a half-written folder.
    """
    bpe_path = find_bpe_file()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"clip_tokenizer_{file_sha256(bpe_path)[:16]}"
    if _is_complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=root))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared (e.g. with a WebUI user)
        write_tokenizer_files(staging, bpe_path)
        try:
            os.rename(staging, folder)
        except OSError:
            # Another process won the race (or an incomplete folder is in the way).
            if not _is_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _TOKENIZER_FILES)


def build_clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A transformers ``CLIPTokenizer`` identical to SD1's (openai/clip-vit-large-patch14), offline.

    Pads/truncates to 77 tokens with ``<|endoftext|>`` when asked (``padding="max_length"``).
    """
    from transformers import CLIPTokenizer

    folder = cached_tokenizer_folder(cache_dir)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
