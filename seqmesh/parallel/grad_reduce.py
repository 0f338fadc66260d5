"""Gradient reduction over the HDP group after all of a step's micro-batches.

Ranks run different numbers of micro-batches (a rank in a large SP group runs fewer), so the
per-backward hooks of DDP would mismatch across ranks. Instead every rank reduces once per step,
after its last backward, in flat buckets. The loss is already divided by the global token count,
so gradients are *summed* (never averaged) to give exactly the single-process gradient.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 32 * 1024 * 1024


def reduce_gradients(params: Iterable[torch.nn.Parameter], group: "dist.ProcessGroup | None" = None,
                     bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum ``.grad`` of ``params`` over ``group``; a parameter without a gradient contributes zeros."""
    params = [p for p in params if p.requires_grad]
    if dist.get_world_size(group) == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, group)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, group)


def _reduce_bucket(grads: list[torch.Tensor], group: "dist.ProcessGroup | None") -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)
