"""The two communication patterns of sequence parallelism, on any process group.

The scheduler hands attention a different group every micro-batch, and hybrid mode talks to a
subset of that group (its Ulysses row or ring column). Creating a process group per subset would
be a world-wide collective, so subsets talk through point-to-point ops addressed by global rank
on the given group; a pattern that spans the whole group uses the group's native all-to-all.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank)


def all_to_all(sends: Sequence[Tensor], recv_numels: Sequence[int], peers: Sequence[int], me: int,
               group: dist.ProcessGroup) -> list[Tensor]:
    """Send flat ``sends[j]`` to group rank ``peers[j]`` and return the flat pieces received from
    each peer (``recv_numels[i]`` elements from ``peers[i]``); ``peers[me]`` is this rank."""
    dtype, device = sends[me].dtype, sends[me].device
    if list(peers) == list(range(dist.get_world_size(group))):
        out = torch.empty(sum(recv_numels), dtype=dtype, device=device)
        dist.all_to_all_single(out, torch.cat(list(sends)), output_split_sizes=list(recv_numels),
                               input_split_sizes=[s.numel() for s in sends], group=group)
        return list(out.split(list(recv_numels)))
    recvs = [sends[me] if i == me else torch.empty(n, dtype=dtype, device=device)
             for i, n in enumerate(recv_numels)]
    ops = []
    for j, peer in enumerate(peers):  # both sides know every size, so empty pieces are skipped on both
        if j != me and sends[j].numel():
            ops.append(dist.P2POp(dist.isend, sends[j].contiguous(), global_rank(group, peer), group))
        if j != me and recv_numels[j]:
            ops.append(dist.P2POp(dist.irecv, recvs[j], global_rank(group, peer), group))
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    return recvs


class RingExchange:
    """Send to the next ring peer and receive from the previous one, asynchronously, so the
    transfer of the next K/V block overlaps the attention on the current one."""

    def __init__(self, next_rank: int, prev_rank: int, group: dist.ProcessGroup, tag: int) -> None:
        self.next_rank, self.prev_rank, self.group, self.tag = next_rank, prev_rank, group, tag
        self._reqs: list = []

    def start(self, send: Tensor, recv: Tensor) -> None:
        # Every rank knows every block's size, so an empty block is skipped by both of its ends.
        ops = [dist.P2POp(op, t, peer, self.group, tag=self.tag)
               for op, t, peer in ((dist.isend, send, self.next_rank), (dist.irecv, recv, self.prev_rank))
               if t.numel()]
        self._reqs = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []
