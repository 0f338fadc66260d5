"""Language-model loss, normalised per token over the whole global step.

Each micro-batch contributes ``sum of its token losses / number of target tokens in the global
batch``; summing those over micro-batches and ranks gives exactly the single-process full-batch
mean, whatever the split. A mean of per-rank or per-micro-batch means would weight short
micro-batches up (the recurring packing/SP bug of shared/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqmesh.trainer.data.packing import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not ``IGNORE_INDEX`` (fp32)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")

