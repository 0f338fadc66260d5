"""Ulysses: all-to-all from sequence shards to head shards, local attention, and back.

Heads need not divide evenly: each of the ``U`` ranks takes a contiguous range of query heads
(sizes differ by at most one, like DeepSpeed's uneven-heads all-to-all) and receives exactly the
key/value heads its query heads read. With GQA and fewer KV heads than ranks, a KV head then goes
to several ranks (replication), and in the backward its gradient comes back from each of them and
is summed. Token counts per rank may differ too (lengths not divisible by the degree).

When every rank holds whole KV groups (``Hkv % U == 0``), pure Ulysses is pipelined over head
chunks: the all-to-all of chunk ``i+1`` and the return of chunk ``i-1`` overlap the attention of
chunk ``i`` (heads are independent), in the forward and in the backward, so only about
``1/chunks`` of the communication is exposed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.kernels.attention import attention_backward, attention_forward
from seqmesh.parallel.sequence.comm import start_all_to_all
from seqmesh.parallel.sequence.layout import split_sizes

Ranges = tuple[tuple[int, int], ...]  # one head range per Ulysses rank


@dataclass(frozen=True)
class HeadSplit:
    """Which query and key/value heads each Ulysses rank attends with."""

    q: Ranges
    kv: Ranges
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

    def chunks(self, max_chunks: int) -> list[tuple[Ranges, Ranges]]:
        """Head chunks for the pipelined path: (q ranges, kv ranges) per chunk, each rank's range
        cut into equal whole-KV-group pieces; a single chunk when that is impossible."""
        per_rank = {ke - ks for ks, ke in self.kv}
        overlap = any(a[1] > b[0] for a, b in zip(self.kv, self.kv[1:]))
        if len(per_rank) != 1 or overlap:
            return [(self.q, self.kv)]
        per = per_rank.pop()
        n = max(c for c in range(1, min(per, max(max_chunks, 1)) + 1) if per % c == 0)
        kv_step, q_step = per // n, per // n * self.group
        return [(tuple((qs + i * q_step, qs + (i + 1) * q_step) for qs, _ in self.q),
                 tuple((ks + i * kv_step, ks + (i + 1) * kv_step) for ks, _ in self.kv)) for i in range(n)]


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


def _width(r: tuple[int, int]) -> int:
    return r[1] - r[0]


@dataclass(frozen=True)
class _Row:
    """One Ulysses row: its ranks (group ranks), this rank's index, tokens held by each rank."""

    peers: list[int]
    me: int
    sizes: list[int]
    group: dist.ProcessGroup

    def start_to_heads(self, xs: list[Tensor], ranges: list[Ranges]):
        """Start sending each ``[n_me, H_t, D]`` tensor's head ranges to their ranks; ``finish``
        gives ``[sum(sizes), width_t(me), D]``: this rank's heads of every row token, in row order."""
        d = xs[0].shape[-1]
        sends = [torch.cat([x[:, r[j][0]:r[j][1]].reshape(-1) for x, r in zip(xs, ranges)])
                 for j in range(len(self.peers))]
        heads = [_width(r[self.me]) for r in ranges]
        pending = start_all_to_all(sends, [n * sum(heads) * d for n in self.sizes], self.peers, self.me, self.group)

        def finish() -> list[Tensor]:
            pieces = [recv.split([n * h * d for h in heads]) for n, recv in zip(self.sizes, pending.wait())]
            return [torch.cat([p[t].view(n, h, d) for n, p in zip(self.sizes, pieces)]) for t, h in enumerate(heads)]
        return finish

    def start_to_tokens(self, xs: list[Tensor], ranges: list[Ranges], outs: list[Tensor]):
        """Inverse of ``start_to_heads``: ``finish`` adds each rank's pieces into ``outs``
        (``[n_me, H_t, D]``), so heads that several ranks held (replicated KV) are summed."""
        d, n_me = xs[0].shape[-1], self.sizes[self.me]
        bounds = [0]
        for n in self.sizes:
            bounds.append(bounds[-1] + n)
        sends = [torch.cat([x[bounds[i]:bounds[i + 1]].reshape(-1) for x in xs]) for i in range(len(self.peers))]
        numels = [n_me * d * sum(_width(r[j]) for r in ranges) for j in range(len(self.peers))]
        pending = start_all_to_all(sends, numels, self.peers, self.me, self.group)

        def finish() -> None:
            for j, recv in enumerate(pending.wait()):
                widths = [_width(r[j]) for r in ranges]
                for out, r, piece, h in zip(outs, ranges, recv.split([n_me * h * d for h in widths]), widths):
                    out[:, r[j][0]:r[j][1]] += piece.view(n_me, h, d)
        return finish


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, split, row):
        ctx.args = (split, row, q.shape[1], k.shape[1])
        return tuple(row.start_to_heads([q, k, v], [split.q, split.kv, split.kv])())

    @staticmethod
    def backward(ctx, dq, dk, dv):
        split, row, hq, hkv = ctx.args
        n, d = row.sizes[row.me], dq.shape[-1]
        outs = [dq.new_zeros(n, h, d) for h in (hq, hkv, hkv)]
        row.start_to_tokens([dq.contiguous(), dk.contiguous(), dv.contiguous()], [split.q, split.kv, split.kv],
                            outs)()
        return (*outs, None, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, split, row, hq):
        ctx.args = (split, row)
        result = out.new_zeros(row.sizes[row.me], hq, out.shape[-1])
        row.start_to_tokens([out], [split.q], [result])()
        return result

    @staticmethod
    def backward(ctx, dout):
        split, row = ctx.args
        return row.start_to_heads([dout.contiguous()], [split.q])()[0], None, None, None


class _PipelinedUlysses(torch.autograd.Function):
    """All-to-all, varlen attention and all-to-all back, chunk by chunk over heads, with every
    chunk's transfers in flight while other chunks compute."""

    @staticmethod
    def forward(ctx, q, k, v, chunks, row, cu, max_len, causal, scale, backend):
        incoming = [row.start_to_heads([q, k, v], [cq, ckv, ckv]) for cq, ckv in chunks]
        out = q.new_zeros(q.shape)
        returning, saved = [], []
        for (cq, _), finish in zip(chunks, incoming):
            qh, kh, vh = finish()
            oh, lse = attention_forward(qh, kh, vh, cu, cu, max_len, max_len, causal=causal, scale=scale,
                                        backend=backend)
            saved += [qh, kh, vh, oh, lse]
            returning.append(row.start_to_tokens([oh], [cq], [out]))
        for finish in returning:
            finish()
        ctx.save_for_backward(*saved, cu)
        ctx.args = (chunks, row, max_len, causal, scale, backend, k.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        *saved, cu = ctx.saved_tensors
        chunks, row, max_len, causal, scale, backend, kv_shape = ctx.args
        dout = dout.contiguous()
        incoming = [row.start_to_heads([dout], [cq]) for cq, _ in chunks]
        dq, dk, dv = dout.new_zeros(dout.shape), dout.new_zeros(kv_shape), dout.new_zeros(kv_shape)
        returning = []
        for i, ((cq, ckv), finish) in enumerate(zip(chunks, incoming)):
            qh, kh, vh, oh, lse = saved[5 * i:5 * i + 5]
            grads = attention_backward(finish()[0], qh, kh, vh, oh, lse, cu, cu, max_len, max_len, causal=causal,
                                       scale=scale, backend=backend)
            returning.append(row.start_to_tokens(list(grads), [cq, ckv, ckv], [dq, dk, dv]))
        for finish in returning:
            finish()
        return dq, dk, dv, None, None, None, None, None, None, None


def seq_to_heads(q: Tensor, k: Tensor, v: Tensor, split: HeadSplit, row: _Row) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-sharded q/k/v -> all tokens of the row, this rank's heads; K/V expanded to one head
    per query head where the local heads are not a regular GQA grouping."""
    qh, kh, vh = _SeqToHeads.apply(q, k, v, split, row)
    index = split.kv_expand_index(row.me)
    if index is not None:
        idx = torch.tensor(index, device=kh.device)
        kh, vh = kh.index_select(1, idx), vh.index_select(1, idx)
    return qh, kh, vh


def heads_to_seq(out: Tensor, split: HeadSplit, row: _Row, hq: int) -> Tensor:
    """This rank's heads of every row token -> this rank's tokens, all heads."""
    return _HeadsToSeq.apply(out, split, row, hq)


def pipelined_ulysses(q: Tensor, k: Tensor, v: Tensor, chunks: list[tuple[Ranges, Ranges]], row: _Row, cu: Tensor,
                      max_len: int, causal: bool, scale: float, backend: str) -> Tensor:
    """Pure Ulysses attention (the row is the whole group) with communication hidden behind
    the attention of other head chunks."""
    return _PipelinedUlysses.apply(q.contiguous(), k.contiguous(), v.contiguous(), chunks, row, cu, max_len, causal,
                                   scale, backend)


def ulysses_row(peers: list[int], me: int, sizes: list[int], group: dist.ProcessGroup) -> _Row:
    return _Row(peers, me, sizes, group)
