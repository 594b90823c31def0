"""The offline CLIP tokenizer gives SD1's real token ids."""

import importlib.util
import json

import pytest

from lora_trainer.backbones import clip_tokenizer
from lora_trainer.backbones.clip_tokenizer import (
    build_clip_tokenizer,
    bytes_to_unicode,
    cached_tokenizer_folder,
    write_tokenizer_files,
)

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(cache_dir=tmp_path_factory.mktemp("tok_cache"))


def test_known_ids(tokenizer):
    assert tokenizer("a cat").input_ids == [BOS, 320, 2368, EOS]
    assert tokenizer("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]
    # "!" is the first printable byte -> id 0; as a whole word it gets "</w>" -> 256 + 0.
    assert tokenizer("!").input_ids == [BOS, 256, EOS]
    # CLIP lowercases and collapses whitespace.
    assert tokenizer("  A   CAT ").input_ids == [BOS, 320, 2368, EOS]


def test_special_tokens_and_sizes(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == BOS
    assert tokenizer.eos_token_id == EOS
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == EOS


def test_padding_to_77(tokenizer):
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[:4] == [BOS, 320, 2368, EOS]
    assert set(ids[4:]) == {EOS}


def test_truncation_to_77(tokenizer):
    ids = tokenizer("cat " * 200, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[0] == BOS and ids[-1] == EOS
    assert set(ids[1:-1]) == {2368}


def test_lora_tag_and_unicode_round_trip(tokenizer):
    text = "<lora:my_style:0.7> a café, 🙂"
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS and ids[-1] == EOS
    # CLIP's decoder turns every word end into a space, so compare without spaces.
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_byte_table_is_reversible_and_printable():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert not any(ch.isspace() for ch in table.values())
    assert table[ord("!")] == "!" and table[ord(" ")] == chr(256 + 32)


def test_written_files(tmp_path):
    folder = write_tokenizer_files(tmp_path / "tokenizer")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>"


def test_written_folder_loads_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(tmp_path / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert loaded("a cat").input_ids == [BOS, 320, 2368, EOS]


def test_cache_folder_is_reused_and_leaves_no_temp(tmp_path):
    first = cached_tokenizer_folder(tmp_path)
    stamp = (first / "vocab.json").stat().st_mtime_ns
    second = cached_tokenizer_folder(tmp_path)
    assert first == second
    assert (second / "vocab.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_missing_bpe_file_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps open_clip_torch"):
        clip_tokenizer.build_clip_tokenizer(cache_dir=tmp_path)
