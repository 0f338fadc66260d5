"""Tolerances from the arithmetic, for comparisons whose two sides round differently by construction.

A distributed run and its single-process reference sum the same terms in other orders and blockings: other
ranks, other thread counts (gloo workers run one thread, the pytest process as many as the machine has), sequence
and vocabulary shards, other matrix shapes. Which bits come out then depends on the CPU's kernels (an AVX2 and
an AVX-512 machine block a product differently), so such comparisons get a bound, never equality.
"""

from __future__ import annotations

import torch
from torch import Tensor

U32 = 2.0 ** -24  # fp32 unit roundoff
EPS32 = torch.finfo(torch.float32).eps  # 2 u


def loss_rel(tokens: int, inner: int) -> float:
    """Relative difference two fp32 computations of a mean per-token loss may show: reordering the sum of
    ``tokens`` non-negative terms moves it by at most (tokens - 1) u, and each term carries the rounding of the
    sums behind it, about ``inner`` u (``inner``: the longest of them, the hidden or MLP width or the vocabulary)."""
    return (tokens + inner) * U32


def grad_atol(ref: Tensor, tokens: int, chained: int) -> float:
    """What fp32 arithmetic can change in a gradient when its per-token sums run in another order (TP shards,
    SP splits, pipeline stages, ZeRO's reductions): the rounding of ``tokens`` contributions adds up like a
    random walk, about eps sqrt(tokens) of the largest value, once per sum of the ``chained`` ones behind it (a
    forward and a backward per layer). An element that cancels to ~0 gets this absolute margin too."""
    return chained * EPS32 * tokens**0.5 * ref.abs().max().item()
