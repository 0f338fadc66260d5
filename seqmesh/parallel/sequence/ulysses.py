"""Ulysses: all-to-all from sequence shards to head shards, local attention, and back.

Heads need not divide evenly: each of the ``U`` ranks takes a contiguous range of query heads
(sizes differ by at most one, like DeepSpeed's uneven-heads all-to-all) and receives exactly the
key/value heads its query heads read. With GQA and fewer KV heads than ranks, a KV head then goes
to several ranks (replication), and in the backward its gradient comes back from each of them and
is summed. Token counts per rank may differ too (lengths not divisible by the degree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.parallel.sequence.comm import all_to_all
from seqmesh.parallel.sequence.layout import split_sizes


@dataclass(frozen=True)
class HeadSplit:
    """Which query and key/value heads each Ulysses rank attends with."""

    q: tuple[tuple[int, int], ...]
    kv: tuple[tuple[int, int], ...]
    group: int  # query heads per KV head in the model

    def kv_expand_index(self, u: int) -> list[int] | None:
        """Local KV head of each local query head, when the local heads are not a regular GQA
        grouping (a query range that cuts through a KV group); None when they are."""
        (qs, qe), (ks, ke) = self.q[u], self.kv[u]
        index = [h // self.group - ks for h in range(qs, qe)]
        per_kv = (qe - qs) // (ke - ks)
        if (qe - qs) % (ke - ks) == 0 and index == [h // per_kv for h in range(qe - qs)]:
            return None
        return index


def head_split(hq: int, hkv: int, degree: int) -> HeadSplit:
    if hq < degree:
        raise ValueError(f"Ulysses degree {degree} exceeds the {hq} query heads; use a smaller ulysses_degree "
                         "(hybrid mode) so every rank gets at least one head")
    group = hq // hkv
    starts = [0]
    for n in split_sizes(hq, degree):
        starts.append(starts[-1] + n)
    q = tuple((starts[u], starts[u + 1]) for u in range(degree))
    kv = tuple((qs // group, (qe - 1) // group + 1) for qs, qe in q)
    return HeadSplit(q, kv, group)


def _to_heads(xs: list[Tensor], ranges: list[tuple[tuple[int, int], ...]], sizes: list[int], me: int,
              peers: list[int], group: dist.ProcessGroup) -> list[Tensor]:
    """Each ``[n_me, H_t, D]`` tensor -> ``[sum(sizes), h_t(me), D]``: this rank's head range of
    every token of the Ulysses row, in row order. One all-to-all carries all tensors."""
    d = xs[0].shape[-1]
    sends = [torch.cat([x[:, r[j][0]:r[j][1]].reshape(-1) for x, r in zip(xs, ranges)]) for j in range(len(peers))]
    heads = [r[me][1] - r[me][0] for r in ranges]
    recvs = all_to_all(sends, [n * sum(heads) * d for n in sizes], peers, me, group)
    pieces = [recv.split([n * h * d for h in heads]) for n, recv in zip(sizes, recvs)]
    return [torch.cat([p[t].view(n, h, d) for n, p in zip(sizes, pieces)]) for t, h in enumerate(heads)]


def _to_tokens(xs: list[Tensor], ranges: list[tuple[tuple[int, int], ...]], totals: list[int], sizes: list[int],
               me: int, peers: list[int], group: dist.ProcessGroup) -> list[Tensor]:
    """Inverse of ``_to_heads``: ``[sum(sizes), h_t(me), D]`` -> ``[n_me, H_t, D]``, summing the
    pieces of heads that several ranks held (replicated KV heads)."""
    d = xs[0].shape[-1]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    sends = [torch.cat([x[bounds[i]:bounds[i + 1]].reshape(-1) for x in xs]) for i in range(len(peers))]
    n_me = sizes[me]
    recv_numels = [n_me * d * sum(r[j][1] - r[j][0] for r in ranges) for j in range(len(peers))]
    recvs = all_to_all(sends, recv_numels, peers, me, group)
    outs = [xs[0].new_zeros(n_me, total, d) for total in totals]
    for j, recv in enumerate(recvs):
        widths = [r[j][1] - r[j][0] for r in ranges]
        for out, r, piece, h in zip(outs, ranges, recv.split([n_me * h * d for h in widths]), widths):
            out[:, r[j][0]:r[j][1]] += piece.view(n_me, h, d)
    return outs


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split, sizes, me, peers, group):
        ctx.args = (split, sizes, me, peers, group, q.shape[1], k.shape[1])
        ranges = [split.q, split.kv, split.kv]
        return tuple(_to_heads([q, k, v], ranges, sizes, me, peers, group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        split, sizes, me, peers, group, hq, hkv = ctx.args
        grads = _to_tokens([dq.contiguous(), dk.contiguous(), dv.contiguous()], [split.q, split.kv, split.kv],
                           [hq, hkv, hkv], sizes, me, peers, group)
        return (*grads, None, None, None, None, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, split, sizes, me, peers, group, hq):
        ctx.args = (split, sizes, me, peers, group)
        return _to_tokens([out], [split.q], [hq], sizes, me, peers, group)[0]

    @staticmethod
    def backward(ctx, dout):
        split, sizes, me, peers, group = ctx.args
        return _to_heads([dout.contiguous()], [split.q], sizes, me, peers, group)[0], None, None, None, None, None, None


def seq_to_heads(q: Tensor, k: Tensor, v: Tensor, split: HeadSplit, sizes: list[int], me: int, peers: list[int],
                 group: dist.ProcessGroup) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-sharded q/k/v -> all tokens of the row, this rank's heads; K/V expanded to one head
    per query head where the local heads are not a regular GQA grouping."""
    qh, kh, vh = _SeqToHeads.apply(q, k, v, split, sizes, me, peers, group)
    index = split.kv_expand_index(me)
    if index is not None:
        idx = torch.tensor(index, device=kh.device)
        kh, vh = kh.index_select(1, idx), vh.index_select(1, idx)
    return qh, kh, vh


def heads_to_seq(out: Tensor, split: HeadSplit, sizes: list[int], me: int, peers: list[int],
                 group: dist.ProcessGroup, hq: int) -> Tensor:
    """This rank's heads of every row token -> this rank's tokens, all heads."""
    return _HeadsToSeq.apply(out, split, sizes, me, peers, group, hq)
