"""Ulysses: all-to-all from sequence shards to head shards, local attention, and back.

Heads need not divide evenly: each of the ``U`` ranks takes a contiguous range of query heads
(sizes differ by at most one, like DeepSpeed's uneven-heads all-to-all) and receives exactly the
key/value heads its query heads read. With GQA and fewer KV heads than ranks, a KV head then goes
to several ranks (replication), and in the backward its gradient comes back from each of them and
is summed. Token counts per rank may differ too (lengths not divisible by the degree).

Each direction moves every byte once and issues one batch of transfers: q, k and v (or dq, dk
and dv) travel together in one ``batch_isend_irecv`` (one NCCL group, one launch, where DeepSpeed
issues an all-to-all per tensor), the sender packs each peer's heads into one contiguous piece per
tensor (the only copy), and the receiver lands them straight in the token rows of the kernel's
input, so the kernel reads them in place. The way back sends the kernel's rows as they are and
copies each piece once into its heads. The own share never leaves the GPU: it is copied while the
transfer runs. (One all-to-all over a packed q|k|v buffer would be one launch too, but each
source's q, k and v would land interleaved and cost every rank an unpacking pass over them.)

Pure Ulysses may also pipeline over head chunks (``ulysses_chunks``): the transfer of chunk
``i+1`` and the return of chunk ``i-1`` overlap the attention of chunk ``i``. It is off by default
because it measured slower at degree 2 on H200 (see ``SPBatch.ulysses_chunks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.kernels.attention import attention_backward, attention_forward
from seqmesh.parallel.sequence.comm import exchange
from seqmesh.parallel.sequence.layout import split_sizes

Ranges = tuple[tuple[int, int], ...]  # one head range per Ulysses rank


def _width(r: tuple[int, int]) -> int:
    return r[1] - r[0]


@dataclass(frozen=True)
class HeadSplit:
    """Which query and key/value heads each Ulysses rank attends with."""

    q: Ranges
    kv: Ranges
    group: int  # query heads per KV head in the model

    @property
    def kv_disjoint(self) -> bool:
        """No KV head goes to two ranks (else their gradients must be summed on the way back)."""
        return all(a[1] <= b[0] for a, b in zip(self.kv, self.kv[1:]))

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
        if len(per_rank) != 1 or not self.kv_disjoint:
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


def rank_head_counts(hq: int, hkv: int, degree: int) -> set[tuple[int, int]]:
    """The (query heads, KV heads) pairs the attention kernels of a Ulysses group of ``degree`` ranks are
    called with: each rank's share of the heads, its KV heads repeated where its query heads cut through a
    GQA group (``kv_expand_index``). What ahead-of-time kernel set-up (cuDNN graphs) must cover."""
    split = head_split(hq, hkv, degree)
    pairs = set()
    for rank, ((qs, qe), (ks, ke)) in enumerate(zip(split.q, split.kv)):
        pairs.add((qe - qs, qe - qs if split.kv_expand_index(rank) is not None else ke - ks))
    return pairs


@dataclass(frozen=True)
class Row:
    """One Ulysses row: its ranks (global ranks, row order), this rank's index, tokens held by
    each rank, and where each rank's tokens start in the row's token order."""

    peers: tuple[int, ...]
    me: int
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    group: dist.ProcessGroup

    def rows(self, j: int) -> slice:
        return slice(self.starts[j], self.starts[j] + self.sizes[j])

    def to_heads(self, xs: Sequence[Tensor], ranges: Sequence[Ranges]) -> Callable[[], list[Tensor]]:
        """Start sending each ``[n_me, H_t, D]`` tensor's head ranges to their ranks; the returned
        ``finish`` waits and gives ``[sum(sizes), width_t(me), D]``: this rank's heads of every row
        token, in row order."""
        n_me, d = self.sizes[self.me], xs[0].shape[-1]
        outs = [x.new_empty(sum(self.sizes), _width(r[self.me]), d) for x, r in zip(xs, ranges)]
        sends, recvs = [], []
        for j in range(len(self.peers)):
            pieces = []
            if j != self.me:
                for x, r in zip(xs, ranges):
                    piece = x.new_empty(n_me, _width(r[j]), d)
                    pieces.append(piece.copy_(x[:, r[j][0]:r[j][1]]) if piece.numel() else piece)
            sends.append(pieces)
            recvs.append([out[self.rows(j)] for out in outs] if j != self.me else [])
        pending = exchange(sends, recvs, self.peers, self.me, self.group)
        for x, r, out in zip(xs, ranges, outs):  # the own share, while the transfer runs
            out[self.rows(self.me)].copy_(x[:, r[self.me][0]:r[self.me][1]])

        def finish() -> list[Tensor]:
            pending.wait()
            return outs
        return finish

    def to_tokens(self, xs: Sequence[Tensor], ranges: Sequence[Ranges], outs: Sequence[Tensor],
                  accumulate: Sequence[bool]) -> Callable[[], None]:
        """Inverse of ``to_heads``: the returned ``finish`` waits and writes each rank's pieces
        into the heads ``ranges[t][j]`` of ``outs[t]`` (``[n_me, H_t, D]``), adding where
        ``accumulate[t]`` (heads that several ranks held; ``outs[t]`` then starts at zero)."""
        n_me, d = self.sizes[self.me], xs[0].shape[-1]
        xs = [x.contiguous() for x in xs]
        sends = [[x[self.rows(j)] for x in xs] if j != self.me else [] for j in range(len(self.peers))]
        recvs = [[x.new_empty(n_me, _width(r[j]), d) for x, r in zip(xs, ranges)] if j != self.me else []
                 for j in range(len(self.peers))]
        pending = exchange(sends, recvs, self.peers, self.me, self.group)

        def place(j: int, pieces: Sequence[Tensor]) -> None:
            for out, r, piece, add in zip(outs, ranges, pieces, accumulate):
                if piece.numel():
                    dst = out[:, r[j][0]:r[j][1]]
                    dst.add_(piece) if add else dst.copy_(piece)
        place(self.me, [x[self.rows(self.me)] for x in xs])  # the own share, while the transfer runs

        def finish() -> None:
            pending.wait()
            for j, pieces in enumerate(recvs):
                if j != self.me:
                    place(j, pieces)
        return finish


@dataclass(frozen=True)
class UlyssesPlan:
    """Everything one layer's Ulysses call needs besides the tensors, built once per micro-batch
    (``SPBatch`` caches it per head shape and device), so a call does no host-side table work."""

    split: HeadSplit
    row: Row
    chunks: tuple[tuple[Ranges, Ranges], ...]
    expand: Tensor | None  # local KV head of each local query head, when not a regular GQA grouping
    hq: int
    hkv: int

    def kv_heads(self, kh: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
        if self.expand is None:
            return kh, vh
        return kh.index_select(1, self.expand), vh.index_select(1, self.expand)

    def kv_grads(self, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of ``kv_heads`` for gradients: sum over the query heads that shared a KV head."""
        if self.expand is None:
            return dk, dv
        width = _width(self.split.kv[self.row.me])
        return tuple(g.new_zeros(g.shape[0], width, g.shape[2]).index_add_(1, self.expand, g) for g in (dk, dv))


def ulysses_plan(hq: int, hkv: int, peers: Sequence[int], me: int, sizes: Sequence[int], group: dist.ProcessGroup,
                 max_chunks: int, device: torch.device) -> UlyssesPlan:
    """``peers``: the row's global ranks; ``sizes``: tokens held by each of them."""
    split = head_split(hq, hkv, len(peers))
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    row = Row(tuple(peers), me, tuple(sizes), tuple(starts), group)
    index = split.kv_expand_index(me)
    expand = None if index is None else torch.tensor(index, dtype=torch.int64, device=device)
    return UlyssesPlan(split, row, tuple(split.chunks(max_chunks)), expand, hq, hkv)


class _Ulysses(torch.autograd.Function):
    """Pure Ulysses as one node: transfer, varlen attention and transfer back, chunk by chunk over
    heads (one chunk unless pipelining), with every chunk's transfers in flight while other chunks
    compute. One node instead of three keeps the intermediate head-sharded tensors out of autograd."""

    @staticmethod
    def forward(ctx, q, k, v, plan, cu, max_len, causal, scale, backend):
        row = plan.row
        incoming = [row.to_heads([q, k, v], [cq, ckv, ckv]) for cq, ckv in plan.chunks]
        out = q.new_empty(q.shape)  # query ranges never overlap: every head is written exactly once
        returning, saved = [], []
        for (cq, _), finish in zip(plan.chunks, incoming):
            qh, kh, vh = finish()
            kh, vh = plan.kv_heads(kh, vh)
            oh, lse = attention_forward(qh, kh, vh, cu, cu, max_len, max_len, causal=causal, scale=scale,
                                        backend=backend)
            saved += [qh, kh, vh, oh, lse]
            returning.append(row.to_tokens([oh], [cq], [out], [False]))
        for finish in returning:
            finish()
        ctx.save_for_backward(*saved)
        # The boundary table itself (as ``_VarlenAttention`` keeps it): a saved-tensor hook's copy would
        # lose its host offsets and read them back from the device in backward.
        ctx.args = (cu, plan, max_len, causal, scale, backend, k.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        cu, plan, max_len, causal, scale, backend, kv_shape = ctx.args
        row = plan.row
        incoming = [row.to_heads([dout], [cq]) for cq, _ in plan.chunks]
        replicated = not plan.split.kv_disjoint
        dq = dout.new_empty(dout.shape)
        dk, dv = ((dout.new_zeros if replicated else dout.new_empty)(kv_shape) for _ in range(2))
        returning = []
        for i, ((cq, ckv), finish) in enumerate(zip(plan.chunks, incoming)):
            qh, kh, vh, oh, lse = saved[5 * i:5 * i + 5]
            gq, gk, gv = attention_backward(finish()[0], qh, kh, vh, oh, lse, cu, cu, max_len, max_len,
                                            causal=causal, scale=scale, backend=backend)
            gk, gv = plan.kv_grads(gk, gv)
            returning.append(row.to_tokens([gq, gk, gv], [cq, ckv, ckv], [dq, dk, dv],
                                           [False, replicated, replicated]))
        for finish in returning:
            finish()
        return dq, dk, dv, None, None, None, None, None, None


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, plan: UlyssesPlan, cu: Tensor, max_len: int, causal: bool,
                      scale: float, backend: str) -> Tensor:
    """Pure Ulysses attention (the row is the whole group) of this rank's tokens: ``[n_me, Hq, D]``."""
    return _Ulysses.apply(q, k, v, plan, cu, max_len, causal, scale, backend)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        ctx.plan = plan
        split = plan.split
        return tuple(plan.row.to_heads([q, k, v], [split.q, split.kv, split.kv])())

    @staticmethod
    def backward(ctx, dq, dk, dv):
        plan = ctx.plan
        split, n, d = plan.split, plan.row.sizes[plan.row.me], dq.shape[-1]
        replicated = not split.kv_disjoint
        outs = [dq.new_empty(n, plan.hq, d)] + [(dq.new_zeros if replicated else dq.new_empty)(n, plan.hkv, d)
                                                  for _ in range(2)]
        plan.row.to_tokens([dq, dk, dv], [split.q, split.kv, split.kv], outs, [False, replicated, replicated])()
        return (*outs, None)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, plan):
        ctx.plan = plan
        result = out.new_empty(plan.row.sizes[plan.row.me], plan.hq, out.shape[-1])
        plan.row.to_tokens([out], [plan.split.q], [result], [False])()
        return result

    @staticmethod
    def backward(ctx, dout):
        return ctx.plan.row.to_heads([dout], [ctx.plan.split.q])()[0], None


def seq_to_heads(q: Tensor, k: Tensor, v: Tensor, plan: UlyssesPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-sharded q/k/v -> all tokens of the row, this rank's heads; K/V expanded to one head
    per query head where the local heads are not a regular GQA grouping (hybrid mode)."""
    qh, kh, vh = _SeqToHeads.apply(q, k, v, plan)
    return (qh, *plan.kv_heads(kh, vh))


def heads_to_seq(out: Tensor, plan: UlyssesPlan) -> Tensor:
    """This rank's heads of every row token -> this rank's tokens, all heads (hybrid mode)."""
    return _HeadsToSeq.apply(out, plan)
