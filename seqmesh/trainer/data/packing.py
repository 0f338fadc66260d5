"""Packing documents into one flat sequence, and documents into token-budget micro-batches.

A packed batch has no padding and no batch dimension: documents are concatenated and
``cu_seqlens`` (the varlen-attention convention of flash-attn) marks where each starts, so attention
and RoPE positions restart per document and no token ever sees another document. Labels are the
next token *within the same document*; the last token of each document gets IGNORE_INDEX, which is
why a document of length L contributes exactly L - 1 targets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor     # [T] int64
    labels: torch.Tensor        # [T] int64, IGNORE_INDEX at each document's last token
    position_ids: torch.Tensor  # [T] int64, 0 at each document's first token
    cu_seqlens: torch.Tensor    # [n + 1] int32, cumulative document lengths starting at 0
    seqlens: list[int]

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_targets(self) -> int:
        return num_targets(self.seqlens)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seqlens"}
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items()})


def num_targets(lengths: Sequence[int]) -> int:
    """Tokens that have a next token in their document: the loss denominator of a global step,
    computable from lengths alone (so every rank knows it before running anything)."""
    return int(sum(int(n) - 1 for n in lengths))


def pack(docs: Sequence[torch.Tensor]) -> PackedBatch:
    if not docs:
        raise ValueError("pack() needs at least one document")
    seqlens = [int(d.numel()) for d in docs]
    if min(seqlens) < 1:
        raise ValueError(f"pack() got an empty document (lengths {seqlens}); drop empty documents first")
    input_ids = torch.cat([d.reshape(-1).long() for d in docs])
    lens = torch.tensor(seqlens, dtype=torch.int64)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=cu[1:])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = input_ids[1:]
    labels[cu[1:] - 1] = IGNORE_INDEX
    position_ids = torch.arange(input_ids.numel()) - torch.repeat_interleave(cu[:-1], lens)
    return PackedBatch(input_ids, labels, position_ids, cu.to(torch.int32), seqlens)

