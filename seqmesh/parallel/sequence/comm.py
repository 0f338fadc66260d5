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


class Pending:
    """An all-to-all in flight; ``wait()`` returns the received pieces."""

    def __init__(self, recvs: list[Tensor], works: list, keep: list[Tensor]) -> None:
        self._recvs, self._works, self._keep = recvs, works, keep

    def wait(self) -> list[Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._keep = [], []
        return self._recvs


def start_all_to_all(sends: Sequence[Tensor], recv_numels: Sequence[int], peers: Sequence[int], me: int,
                     group: dist.ProcessGroup) -> Pending:
    """Send flat ``sends[j]`` to group rank ``peers[j]`` and receive ``recv_numels[i]`` elements
    from ``peers[i]`` (``peers[me]`` is this rank), asynchronously."""
    dtype, device = sends[me].dtype, sends[me].device
    if list(peers) == list(range(dist.get_world_size(group))):
        out = torch.empty(sum(recv_numels), dtype=dtype, device=device)
        send = torch.cat(list(sends))
        work = dist.all_to_all_single(out, send, output_split_sizes=list(recv_numels),
                                      input_split_sizes=[s.numel() for s in sends], group=group, async_op=True)
        return Pending(list(out.split(list(recv_numels))), [work], [send])
    recvs = [sends[me] if i == me else torch.empty(n, dtype=dtype, device=device)
             for i, n in enumerate(recv_numels)]
    ops = []
    for j, peer in enumerate(peers):  # both sides know every size, so empty pieces are skipped on both
        if j != me and sends[j].numel():
            ops.append(dist.P2POp(dist.isend, sends[j].contiguous(), global_rank(group, peer), group))
        if j != me and recv_numels[j]:
            ops.append(dist.P2POp(dist.irecv, recvs[j], global_rank(group, peer), group))
    return Pending(recvs, dist.batch_isend_irecv(ops) if ops else [], [op.tensor for op in ops])


def all_to_all(sends: Sequence[Tensor], recv_numels: Sequence[int], peers: Sequence[int], me: int,
               group: dist.ProcessGroup) -> list[Tensor]:
    """``start_all_to_all`` and wait for it."""
    return start_all_to_all(sends, recv_numels, peers, me, group).wait()


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
