"""Which layers to offload in a micro-batch: only as many as the compute hides (ByteScale's rule).

A layer's offloaded bytes grow with its tokens ``t`` and its compute with ``t`` and ``t^2``
(attention), so short micro-batches can hide little transfer and long ones all of it. For each
micro-batch the policy prices one layer with the scheduler's cost model (the same one that placed
the sequences) and the measured link bandwidths, and offloads the share::

    ratio = min(1, safety * min(forward_ms * bw_out, backward_ms * bw_in) / bytes_per_layer)

where ``forward_ms``/``backward_ms`` are one layer's forward and backward(+recompute) time (a
quarter/three quarters of its step time under activation checkpointing, a third/two thirds
without) and ``bw`` the slowest link the bytes cross (PCIe for ``cpu``, PCIe then disk for
``nvme``). Offloaded layers are spread evenly over the depth, and backward prefetches each one a
whole gap of layers ahead, so every transfer has ``1/ratio`` layers of compute to hide behind while
at most about one offloaded layer is in flight. Under ``auto`` the last layer is never offloaded:
backward needs it first, so there is nothing to hide its reload behind and no memory to gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from seqmesh.scheduler.cost_model import CostModel


@dataclass(frozen=True)
class Selection:
    """The offload decision for one micro-batch."""

    groups: frozenset[int]  # offloaded layers (forward order)
    lookahead: int  # how many layers ahead backward prefetches
    ratio: float  # the share asked for (before rounding to whole layers)


def estimate_bytes_per_token(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                             checkpointed: bool, stream_bytes: int, compute_bytes: int) -> float:
    """What one layer saves for backward per token, before the first micro-batch measures it.

    Checkpointed: the layer input (the residual stream). Otherwise: what attention saves (the
    projections' input, q, k, v, the output and the fp32 log-sum-exp).
    """
    if checkpointed:
        return float(hidden_size * stream_bytes)
    return float((hidden_size + 2 * num_heads * head_dim + 2 * num_kv_heads * head_dim) * compute_bytes
                 + 4 * num_heads)


@dataclass(frozen=True)
class OffloadPolicy:
    """Offload ``ratio`` of ``num_groups`` layers, or (ratio None) the share the compute hides."""

    num_groups: int
    ratio: float | None = None
    cost_model: CostModel | None = None
    num_layers: int | None = None  # layers the cost model prices (default: num_groups)
    h2d_GBps: float = 25.0
    disk_GBps: float | None = None  # set for file offload: the slower leg of every transfer
    checkpointed: bool = True
    safety: float = 0.8

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise ValueError(f"offload policy: num_groups={self.num_groups} must be >= 1")
        if self.ratio is not None and not 0 <= self.ratio <= 1:
            raise ValueError(f"offload.ratio={self.ratio} must lie in [0, 1] (or be 'auto')")
        if self.ratio is None and self.cost_model is None:
            raise ValueError("offload.ratio=auto needs a cost model to price the compute that hides transfers; "
                             "pass one or set offload.ratio to a number in [0, 1]")
        for key in ("h2d_GBps", "disk_GBps"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"offload policy: {key}={v!r} must be > 0 (GB/s)")
        if not 0 < self.safety <= 1:
            raise ValueError(f"offload policy: safety={self.safety} must lie in (0, 1]")

    def auto_ratio(self, seqlens: Sequence[int], group_size: int, bytes_per_token: float) -> float:
        """The share of layers whose transfers one layer's compute hides, for this micro-batch."""
        assert self.cost_model is not None
        layers = self.num_layers or self.num_groups
        layer_ms = float(sum(self.cost_model.seq_ms(s, group_size) for s in seqlens)) / layers
        forward_share = 0.25 if self.checkpointed else 1 / 3
        forward_ms, backward_ms = layer_ms * forward_share, layer_ms * (1 - forward_share)
        tokens = sum(seqlens) / group_size
        bw = min(self.h2d_GBps, self.disk_GBps or math.inf)
        transfer_ms = tokens * bytes_per_token / (bw * 1e6)
        if transfer_ms <= 0:
            return 1.0
        return min(1.0, self.safety * min(forward_ms, backward_ms) / transfer_ms)

    def select(self, seqlens: Sequence[int], group_size: int, bytes_per_token: float) -> Selection:
        """The layers to offload for a micro-batch of documents ``seqlens`` over ``group_size`` ranks."""
        auto = self.ratio is None
        ratio = self.auto_ratio(seqlens, group_size, bytes_per_token) if auto else float(self.ratio)
        n = math.floor(ratio * self.num_groups + 1e-9)
        if auto:
            n = min(n, self.num_groups - 1)
        if n <= 0:
            return Selection(frozenset(), 1, ratio)
        groups = frozenset(i * self.num_groups // n for i in range(n))
        return Selection(groups, max(1, math.ceil(self.num_groups / n)), ratio)
