"""The two communication patterns of sequence parallelism, on any process group.

The scheduler hands attention a different group every micro-batch, and hybrid mode talks to a
subset of that group (its Ulysses row or ring column). Creating a process group per subset would
be a world-wide collective, so every pattern is a batch of point-to-point ops addressed by global
rank on the given group; on NCCL a batch runs as one group call on the group's communicator.
"""

from __future__ import annotations

from typing import Sequence

import torch.distributed as dist
from torch import Tensor


def global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)


class Pending:
    """Transfers in flight; ``wait()`` orders the current stream after them (NCCL) or blocks
    until they are done (gloo). The tensors stay referenced until then."""

    def __init__(self, works: list, keep: list[Tensor]) -> None:
        self._works, self._keep = works, keep

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works, self._keep = [], []


def exchange(sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]], peers: Sequence[int], me: int,
             group: dist.ProcessGroup) -> Pending:
    """Send the contiguous tensors ``sends[j]`` to global rank ``peers[j]`` and receive into
    ``recvs[j]`` from it, for every ``j != me``, as one batch (one NCCL group: a single launch for
    all tensors and peers, where an all-to-all per tensor would launch once per tensor).

    Receiving straight into the caller's tensors is what lets Ulysses skip the unpacking copy
    that a single all-to-all buffer would need. Both ends know every size, so empty tensors are
    skipped on both; the i-th tensors of a pair match by order (and by tag, for gloo).
    """
    ops = []
    for j, peer in enumerate(peers):
        if j == me:
            continue
        ops += [dist.P2POp(dist.isend, t, peer, group, tag=i) for i, t in enumerate(sends[j]) if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, peer, group, tag=i) for i, t in enumerate(recvs[j]) if t.numel()]
    return Pending(dist.batch_isend_irecv(ops) if ops else [], [op.tensor for op in ops])


class RingExchange:
    """Send to the next ring peer and receive from the previous one, asynchronously, so the
    transfer of the next K/V block overlaps the attention on the current one."""

    def __init__(self, next_rank: int, prev_rank: int, group: dist.ProcessGroup, tag: int) -> None:
        self.next_rank, self.prev_rank, self.group, self.tag = next_rank, prev_rank, group, tag
        self._reqs: list = []
        self._keep: list[Tensor] = []

    def start(self, send: Tensor, recv: Tensor) -> None:
        # Every rank knows every block's size, so an empty block is skipped by both of its ends.
        ops = [dist.P2POp(op, t, peer, self.group, tag=self.tag)
               for op, t, peer in ((dist.isend, send, self.next_rank), (dist.irecv, recv, self.prev_rank))
               if t.numel()]
        self._reqs = dist.batch_isend_irecv(ops) if ops else []
        self._keep = [send, recv]  # alive until the transfer is done, even if the caller drops them

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs, self._keep = [], []
