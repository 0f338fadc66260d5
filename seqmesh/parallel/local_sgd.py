"""Local updates with an asynchronous outer synchronisation (CO2), for slow links between node groups.

Why: across a slow link (Ethernet between fabrics, a WAN) even a fully overlapped per-step gradient
reduction costs more than the step. CO2 (Sun et al., ICLR 2024) lets each node group train on its
own for ``k`` steps (gradients reduced only inside the group, over its fast links) and averages the
groups' progress every ``k`` steps, *asynchronously*: the average of round ``r`` travels while round
``r + 1`` computes, and is applied one round late. So the slow link carries ``1/k`` of the traffic
and never stalls a step as long as ``k`` steps take longer than one exchange.

The algorithm (``OuterSync.boundary``, every ``k`` optimizer steps; all vectors are the flattened
parameters in fp32):

1. ``d_b = snapshot - local``: how far this group moved in round ``b`` (a pseudo-gradient).
2. Launch the average of ``d_b`` over the groups (``OuterLink``: an all-reduce over the ranks that
   hold the same part of the model in every group); do not wait for it.
3. Wait for round ``b - 1``'s average ``D``, launched ``k`` steps ago (normally long done).
4. Outer step on the anchor ``x`` (the model every group agreed on), outer momentum ``m``:
   ``m = beta m + p D``; clip ``m`` to norm ``clip``; ``x = x - lr m``, where ``p`` is CO2's
   staleness penalty: ``D`` is a round old, and how much a round's average changes,
   ``g = |D - D_prev| / |D_prev|``, is what its staleness can cost; ``p = 1 / (1 + lambda g)``
   damps the stale update in proportion (``lambda = 0``: no penalty). Every quantity is the same
   on every rank, so the anchors stay identical.
5. ``local = x - d_b``: the agreed model plus this group's newest, not yet averaged, round.

With ``lr = 1``, ``beta = 0``, ``lambda = 0`` this is plain model averaging one round late. The
inner optimizer's states stay local (as in CO2). Each rank of a group averages only its ``1/L``
slice of the vector over the slow link and the group all-gathers the slices over its fast links,
so the slow link carries one copy of the model per group, not ``L``.

This follows CO2's published design (local steps, one-round asynchronous averaging, outer momentum,
a staleness penalty and momentum clipping); the penalty's exact form here is seqmesh's, stated
above, not the paper's constants.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


TRACE_LEN = 300  # (event, time) pairs kept: the last hundred rounds


@dataclass(frozen=True)
class OuterConfig:
    """The outer optimizer (``parallel.local_sgd_*`` keys)."""

    every: int
    lr: float = 1.0
    momentum: float = 0.0
    staleness_penalty: float = 0.0
    clip: float = 0.0  # max norm of the outer momentum; 0: none

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"local SGD: every={self.every} must be >= 1 (optimizer steps between outer syncs)")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.staleness_penalty < 0 or self.clip < 0:
            raise ValueError(f"local SGD: outer lr={self.lr} must be > 0, momentum={self.momentum} in [0, 1), "
                             f"staleness_penalty={self.staleness_penalty} and clip={self.clip} >= 0")


class Pending(Protocol):
    def wait(self) -> None: ...


class OuterLink(Protocol):
    """Sums a tensor over the groups in the background: ``start`` returns at once."""

    def start(self, tensor: Tensor) -> Pending: ...


class AllReduceLink:
    """The real link: an asynchronous all-reduce over the outer group (its own process group, so
    nothing else is ordered behind it)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def start(self, tensor: Tensor) -> Pending:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)


class OuterSync:
    """CO2's outer loop over ``params`` (module docstring). ``groups``: number of node groups;
    ``inner_group``/``inner_size``/``inner_rank``: this rank's node group (the slices' all-gather).

    It holds four fp32 copies of the parameters (anchor, snapshot, outer momentum, the last average),
    as CO2 does, and ``trace``: the times of its recent launches, waits and applications."""

    def __init__(self, params: Sequence[Tensor], config: OuterConfig, link: OuterLink, *, groups: int,
                 inner_group: dist.ProcessGroup | None, inner_size: int, inner_rank: int) -> None:
        if groups < 2:
            raise ValueError(f"local SGD needs at least 2 node groups, got {groups}")
        self.params, self.config, self.link, self.groups = list(params), config, link, groups
        self.inner_group, self.inner_size, self.inner_rank = inner_group, inner_size, inner_rank
        flat = self._flat()
        self.numel = flat.numel()
        self.slice_len = -(-self.numel // inner_size)
        self.anchor = flat
        self.snapshot = flat.clone()
        self.momentum = torch.zeros_like(flat)
        self.previous: Tensor | None = None       # the last applied round average (staleness gap)
        self.pending: tuple[Pending, Tensor] | None = None
        self.rounds = 0
        self.trace: collections.deque[tuple[str, float]] = collections.deque(maxlen=TRACE_LEN)

    def _flat(self) -> Tensor:
        """A copy of the parameters as one fp32 vector (never a view: one tensor flattens to a view)."""
        return _flatten_dense_tensors([p.detach().float() for p in self.params]).clone()

    def _slice(self, v: Tensor) -> Tensor:
        lo = self.inner_rank * self.slice_len
        out = torch.zeros(self.slice_len, dtype=v.dtype, device=v.device)
        part = v[lo:lo + self.slice_len]
        out[:part.numel()] = part
        return out

    def _gather(self, mine: Tensor) -> Tensor:
        if self.inner_size == 1:
            return mine[:self.numel]
        whole = torch.empty(self.slice_len * self.inner_size, dtype=mine.dtype, device=mine.device)
        dist.all_gather_single(whole, mine, group=self.inner_group)
        return whole[:self.numel]

    def after_step(self, step: int) -> bool:
        """Call after every optimizer step (``step`` counts from 1); syncs at every ``every``-th. Returns
        whether it did."""
        if step % self.config.every:
            return False
        self.boundary()
        return True

    def boundary(self) -> None:
        local = self._flat()
        moved = self.snapshot - local
        buffer = self._slice(moved)
        self.trace.append(("launch", time.perf_counter()))
        launched = (self.link.start(buffer), buffer)
        if self.pending is not None:
            self._apply(*self.pending, moved)
        self.pending = launched
        self.snapshot = self._flat()

    def finish(self) -> None:
        """Wait for the round in flight and apply it (the end of training: no collective left pending)."""
        if self.pending is not None:
            self._apply(*self.pending, self.snapshot - self._flat())  # keep the steps since the boundary
            self.pending = None
            self.snapshot = self._flat()

    def _apply(self, work: Pending, buffer: Tensor, newest: Tensor) -> None:
        """Outer step with a round's average (waited for here), then local = anchor - newest."""
        self.trace.append(("wait", time.perf_counter()))
        work.wait()
        self.trace.append(("applied", time.perf_counter()))
        average = self._gather(buffer / self.groups)
        cfg = self.config
        penalty = 1.0
        if cfg.staleness_penalty and self.previous is not None:
            base = float(self.previous.norm())
            if base > 0:
                penalty = 1.0 / (1.0 + cfg.staleness_penalty * float((average - self.previous).norm()) / base)
        self.previous = average
        self.momentum.mul_(cfg.momentum).add_(average, alpha=penalty)
        if cfg.clip:
            norm = float(self.momentum.norm())
            if norm > cfg.clip and math.isfinite(norm):
                self.momentum.mul_(cfg.clip / norm)
        self.anchor.sub_(self.momentum, alpha=cfg.lr)
        new_local = self.anchor - newest
        with torch.no_grad():
            for p, v in zip(self.params, _unflatten_dense_tensors(new_local, [p.detach().float() for p in self.params])):
                p.copy_(v.to(p.dtype))
        self.rounds += 1
