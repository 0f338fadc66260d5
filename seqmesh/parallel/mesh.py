"""The process mesh ``world = PP x HDP x TP`` (TP innermost) and its cached sequence-parallel groups.

HDP is the data x sequence plane: all its ranks hold the same model shard, so gradients are
always reduced over the whole HDP group, while the scheduler regroups HDP ranks into SP groups
every micro-batch. SP groups are contiguous HDP index ranges, created on first use and cached.
``torch.distributed.new_group`` is collective over the *world*, so creation happens in
``ensure_sp_groups`` where every rank walks the same plan in the same order (and the fixed groups
-- HDP, TP, model parallel, embedding -- on first use, which every rank reaches in the same order).

A pipeline line is the ``pp`` ranks of one (HDP, TP) index: stage p of the line is ``pp_ranks()[p]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch.distributed as dist

from seqmesh import first_use


@dataclass
class Mesh:
    world: int
    rank: int
    tp: int = 1
    pp: int = 1
    local_groups: int = 1  # node groups of local updates (seqmesh.parallel.local_sgd); 1: none
    _sp_groups: dict[tuple[int, int], "dist.ProcessGroup"] = field(default_factory=dict, repr=False)
    _hdp_group: "dist.ProcessGroup | None" = field(default=None, repr=False)
    _grad_group: "dist.ProcessGroup | None" = field(default=None, repr=False)
    _tp_group: "dist.ProcessGroup | None" = field(default=None, repr=False)
    _mp_group: "dist.ProcessGroup | None" = field(default=None, repr=False)
    _embedding_group: "dist.ProcessGroup | None" = field(default=None, repr=False)
    _embedding_made: bool = field(default=False, repr=False)  # middle stages hold no embedding group
    _channels: "tuple[dist.ProcessGroup, ...] | None" = field(default=None, repr=False)
    _inner: "tuple[dist.ProcessGroup, dist.ProcessGroup] | None" = field(default=None, repr=False)
    _outer_group: "dist.ProcessGroup | None" = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.world % (self.tp * self.pp):
            raise ValueError(f"world size {self.world} is not divisible by tp x pp = {self.tp} x {self.pp}; "
                             f"change the number of ranks or the layout")
        if self.local_groups < 1 or self.hdp % self.local_groups:
            raise ValueError(f"local_groups={self.local_groups} must divide the {self.hdp} HDP ranks")

    @property
    def hdp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def hdp_rank(self) -> int:
        return (self.rank // self.tp) % self.hdp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.hdp)

    def global_rank(self, pp_rank: int, hdp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.hdp + hdp_rank) * self.tp + tp_rank

    def hdp_ranks(self, pp_rank: int | None = None, tp_rank: int | None = None) -> list[int]:
        """Global ranks of one HDP plane (this rank's by default)."""
        p = self.pp_rank if pp_rank is None else pp_rank
        t = self.tp_rank if tp_rank is None else tp_rank
        return [self.global_rank(p, h, t) for h in range(self.hdp)]

    @property
    def hdp_group(self) -> "dist.ProcessGroup | None":
        """Gradient-reduction group; None means the default (world) group when the world is one plane."""
        if self.tp == 1 and self.pp == 1:
            return None
        if self._hdp_group is None:
            for p in range(self.pp):
                for t in range(self.tp):
                    g = _new_group(self.hdp_ranks(p, t))
                    if p == self.pp_rank and t == self.tp_rank:
                        self._hdp_group = g
        return self._hdp_group

    @property
    def grad_group(self) -> "dist.ProcessGroup":
        """This rank's HDP ranks again, in a group that carries only the gradient buckets
        (``seqmesh.parallel.grad_reduce``): buckets reduced during backward are in flight while a rank
        still runs its own micro-batches, so no other collective may share their group's order."""
        if self._grad_group is None:
            for p in range(self.pp):
                for t in range(self.tp):
                    g = _new_group(self.hdp_ranks(p, t))
                    if p == self.pp_rank and t == self.tp_rank:
                        self._grad_group = g
        return self._grad_group

    # ---- local updates: node groups of HDP ranks (seqmesh.parallel.local_sgd) ----------------------
    @property
    def inner_size(self) -> int:
        """HDP ranks per node group (all of HDP without local updates)."""
        return self.hdp // self.local_groups

    @property
    def inner_rank(self) -> int:
        return self.hdp_rank % self.inner_size

    def inner_index(self, hdp_rank: int) -> int:
        """The node group holding an HDP rank."""
        return hdp_rank // self.inner_size

    def _inner_groups(self) -> "tuple[dist.ProcessGroup, dist.ProcessGroup]":
        """(optimizer group, gradient-bucket group) of this rank's node group: two, as ``grad_group`` explains."""
        if self._inner is None:
            for p in range(self.pp):
                for t in range(self.tp):
                    for k in range(self.local_groups):
                        ranks = [self.global_rank(p, k * self.inner_size + i, t) for i in range(self.inner_size)]
                        pair = (_new_group(ranks), _new_group(ranks))
                        if (p, t, k) == (self.pp_rank, self.tp_rank, self.inner_index(self.hdp_rank)):
                            self._inner = pair
        return self._inner

    @property
    def inner_group(self) -> "dist.ProcessGroup | None":
        """The group gradients and ZeRO shards live in: the node group under local updates, else HDP."""
        return self.hdp_group if self.local_groups == 1 else self._inner_groups()[0]

    @property
    def inner_grad_group(self) -> "dist.ProcessGroup":
        """``grad_group``'s counterpart inside the node group."""
        return self.grad_group if self.local_groups == 1 else self._inner_groups()[1]

    @property
    def outer_group(self) -> "dist.ProcessGroup":
        """The ranks holding the same slice in every node group: the outer synchronisation's (slow) links."""
        if self._outer_group is None:
            for p in range(self.pp):
                for t in range(self.tp):
                    for i in range(self.inner_size):
                        g = _new_group([self.global_rank(p, k * self.inner_size + i, t)
                                        for k in range(self.local_groups)])
                        if (p, t, i) == (self.pp_rank, self.tp_rank, self.inner_rank):
                            self._outer_group = g
        return self._outer_group

    def tp_ranks(self, pp_rank: int | None = None, hdp_rank: int | None = None) -> list[int]:
        """Global ranks of one TP group (this rank's by default): consecutive, so they share a node's links."""
        p = self.pp_rank if pp_rank is None else pp_rank
        h = self.hdp_rank if hdp_rank is None else hdp_rank
        return [self.global_rank(p, h, t) for t in range(self.tp)]

    @property
    def tp_group(self) -> "dist.ProcessGroup | None":
        """Tensor-parallel group (created collectively on first use, like ``hdp_group``); None when tp is 1."""
        if self.tp == 1:
            return None
        if self._tp_group is None:
            for p in range(self.pp):
                for h in range(self.hdp):
                    g = _new_group(self.tp_ranks(p, h))
                    if p == self.pp_rank and h == self.hdp_rank:
                        self._tp_group = g
        return self._tp_group

    def pp_ranks(self, hdp_rank: int | None = None, tp_rank: int | None = None) -> list[int]:
        """Global ranks of one pipeline line (this rank's by default), stage p at index p."""
        h = self.hdp_rank if hdp_rank is None else hdp_rank
        t = self.tp_rank if tp_rank is None else tp_rank
        return [self.global_rank(p, h, t) for p in range(self.pp)]

    @property
    def model_parallel_group(self) -> "dist.ProcessGroup | None":
        """The PP x TP ranks of this rank's HDP index: together they hold the whole model once, so the
        global gradient norm sums over them (and over HDP shards). None when pp and tp are 1."""
        if self.tp == 1 and self.pp == 1:
            return None
        if self._mp_group is None:
            for h in range(self.hdp):
                g = _new_group([r for p in range(self.pp) for r in self.tp_ranks(p, h)])
                if h == self.hdp_rank:
                    self._mp_group = g
        return self._mp_group

    @property
    def embedding_group(self) -> "dist.ProcessGroup | None":
        """The first and last stage of this rank's pipeline line (a tied embedding's owner and copy);
        None on middle stages and without PP. Every rank must ask for it once (creation is collective)."""
        if self.pp == 1:
            return None
        if not self._embedding_made:
            for h in range(self.hdp):
                for t in range(self.tp):
                    g = _new_group([self.global_rank(0, h, t), self.global_rank(self.pp - 1, h, t)])
                    if (h, t) == (self.hdp_rank, self.tp_rank) and self.pp_rank in (0, self.pp - 1):
                        self._embedding_group = g
            self._embedding_made = True
        return self._embedding_group

    @property
    def pipeline_channels(self) -> "tuple[dist.ProcessGroup, ...] | None":
        """The pipeline's four point-to-point groups (activations / gradients x even / odd sending stage),
        see ``seqmesh.parallel.pipeline``; None without PP. Each spans the world: NCCL only builds the
        communicators of the pairs that exchange messages."""
        if self.pp == 1:
            return None
        if self._channels is None:
            self._channels = tuple(_new_group(list(range(self.world))) for _ in range(4))
        return self._channels

    def ensure_sp_groups(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Create (collectively, on every rank) the SP groups for HDP ranges ``(first, count)`` not yet cached."""
        for first, count in sorted(set(ranges)):
            if count == 1 or (first, count) in self._sp_groups:
                continue
            if first < 0 or first + count > self.hdp:
                raise ValueError(f"SP group [{first}, {first + count}) lies outside the {self.hdp} HDP ranks")
            for p in range(self.pp):
                for t in range(self.tp):
                    ranks = self.hdp_ranks(p, t)[first:first + count]
                    g = _new_group(ranks)
                    if p == self.pp_rank and t == self.tp_rank:
                        self._sp_groups[(first, count)] = g

    def sp_group(self, first: int, count: int) -> "dist.ProcessGroup | None":
        """The cached group for HDP ranks ``[first, first + count)``; None for a single rank."""
        if count == 1:
            return None
        try:
            return self._sp_groups[(first, count)]
        except KeyError:
            raise RuntimeError(f"SP group ({first}, {count}) was not created; call ensure_sp_groups with the "
                               f"step's plan on every rank first") from None


def _new_group(ranks: list[int]) -> "dist.ProcessGroup":
    """``dist.new_group``, recorded as one-off work (``seqmesh.first_use``): creating a group, and
    setting up its communicator at its first collective, costs the step that does it, never a later one."""
    first_use.note("process_group")
    return dist.new_group(ranks)
