"""The causal-LM dataset as the plan sees it: records (with `repeats`), a manifest hash, and per
record a length bucket, so a batch holds sequences of similar length (little padding).

With `packing`, consecutive samples (in file order) are concatenated into rows of at most
max_seq_length tokens; a sample is never split. Each sample keeps its own positions (0, 1, ...),
from which transformers builds a block-diagonal causal mask: packed samples do not see each other.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .encode import TokenizedSample

LENGTH_BUCKETS = 8   # at most this many length buckets (so batches are rarely partial)


@dataclass(frozen=True)
class Row:
    """One training sequence: one sample, or several packed ones."""
    samples: tuple           # TokenizedSample, ...
    repeats: int = 1

    @property
    def length(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    @property
    def source(self) -> str:
        return self.samples[0].source + (f" (+{len(self.samples) - 1} packed)" if len(self.samples) > 1 else "")


def pack(samples: list[TokenizedSample], max_len: int) -> list[Row]:
    rows: list[Row] = []
    current: list[TokenizedSample] = []
    used = 0
    for sample in samples:
        if current and used + len(sample.input_ids) > max_len:
            rows.append(Row(tuple(current)))
            current, used = [], 0
        current.append(sample)
        used += len(sample.input_ids)
    if current:
        rows.append(Row(tuple(current)))
    return rows


class LMDataset:
    def __init__(self, samples: list[TokenizedSample], max_seq_length: int, packing: bool,
                 root: str = "", template_used: bool = True):
        self.samples = samples
        self.root, self.template_used = root, template_used
        self.max_seq_length = max_seq_length
        self.records = pack(samples, max_seq_length) if packing else [Row((s,)) for s in samples]
        width = max(1, -(-max_seq_length // LENGTH_BUCKETS))
        # packed rows are all about max_seq_length long: one bucket
        self.length_buckets = [0 if packing else r.length // width for r in self.records]
        self.warnings: list[str] = []
        truncated = [s for s in samples if s.truncated]
        if truncated:
            self.warnings.append(f"{len(truncated)} sample(s) were longer than max_seq_length "
                                 f"{max_seq_length} and are truncated: "
                                 + ", ".join(f"{s.source} ({s.original_length} tokens)" for s in truncated[:5])
                                 + (" ..." if len(truncated) > 5 else ""))

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def num_images(self) -> int:   # the start report's item count; here: samples before packing
        return len(self.samples)

    def manifest_hash(self) -> str:
        h = hashlib.sha256()
        for row in self.records:
            h.update(json.dumps([[s.source, s.input_ids, s.trainable] for s in row.samples]).encode())
        return h.hexdigest()

    def summary(self) -> str:
        return f"{self.describe()}, root {self.root}"

    def describe(self) -> str:
        lengths = [len(s.input_ids) for s in self.samples]
        targets = sum(s.num_targets for s in self.samples)
        text = (f"{len(self.samples)} samples, {sum(lengths)} tokens ({targets} trained), "
                f"length {min(lengths)}-{max(lengths)}")
        if len(self.records) != len(self.samples):
            text += f", packed into {len(self.records)} rows of at most {self.max_seq_length} tokens"
        return text


def index_lm_dataset(cfg) -> LMDataset:
    """Read and tokenise the data with the base model's tokenizer (loaded alone: data errors come
    before the model load)."""
    from pathlib import Path

    from .encode import Encoder, encode_all
    from .model import load_tokenizer
    from .records import read_samples

    tokenizer = load_tokenizer(Path(cfg.base_model))
    encoder = Encoder(tokenizer, cfg.train_on, cfg.max_seq_length, cfg.overlong_samples)
    samples = encode_all(encoder, read_samples(cfg.train_data_dir))
    return LMDataset(samples, cfg.max_seq_length, cfg.packing, str(cfg.train_data_dir), encoder.has_template)
