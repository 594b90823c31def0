"""Rows -> model inputs, and the loss of one micro-batch.

The loss of a row is the mean cross-entropy over its trained tokens; the loss of a micro-batch is
the mean over its rows. Like the SD loss (a mean per sample), this keeps a step's gradient the same
however its rows are split into micro-batches (OOM halving, several processes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def collate(rows, pad_id: int, device) -> dict[str, torch.Tensor | None]:
    """Right-padded batch. Every sample restarts its positions at 0; packed rows (several samples)
    then get a block-diagonal mask from transformers, plain rows a padding mask."""
    width = max(r.length for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for sample in row.samples:
            n = len(sample.input_ids)
            ids[i, at:at + n] = torch.tensor(sample.input_ids)
            labels[i, at:at + n] = torch.tensor([t if keep else IGNORE
                                                 for t, keep in zip(sample.input_ids, sample.trainable)])
            positions[i, at:at + n] = torch.arange(n)
            at += n
        mask[i, :at] = 1
        positions[i, at:] = torch.arange(width - at)   # padding is a block of its own
    packed = any(len(r.samples) > 1 for r in rows)
    batch: dict[str, torch.Tensor | None] = {"input_ids": ids.to(device), "position_ids": positions.to(device), "labels": labels.to(device)}
    # transformers finds the packed blocks from the positions only when no 2-D mask is given
    batch["attention_mask"] = None if packed else mask.to(device)
    return batch


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each row's trained tokens: [B, T, V], [B, T] -> [B]."""
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0),
                                 reduction="none")
    keep = (targets != IGNORE).float()
    return (token_loss * keep).sum(1) / keep.sum(1).clamp(min=1)


def batch_loss(model, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return per_row_loss(out.logits, batch["labels"]).mean()
