"""Zigzag ring attention over packed variable-length documents.

Ring position ``r`` holds, for every document, chunk ``r`` (stream part A) and chunk ``2R-1-r``
(part B) of its ``2R`` chunks (see ``layout``). At ring step ``t`` it holds the K/V of position
``s = r - t``; by chunk order the work is:

* ``s == r``: A causal on A, B causal on B, B on A (full);
* ``s < r``:  A and B on the keys of ``s``'s part A (full); its part B lies in their future;
* ``s > r``:  B on both parts of ``s`` (full); A precedes everything ``s`` holds.

so every step costs the same on every rank (the zigzag balance), and each block is a plain varlen
call on contiguous parts. Partial outputs are merged in fp32 through their LSE (bf16 merging
drifts with ring size). K/V travel with double-buffered ``batch_isend_irecv`` that overlaps the
next transfer with the current block. The backward sends K/V around again and, one step behind,
the fp32 dK/dV accumulator of each block, which arrives at its owner after a full turn (the last
hop in the input dtype: it carries finished sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.kernels.attention import attention_backward, attention_forward, cu_seqlens_table, merge_partial
from seqmesh.parallel.sequence.comm import RingExchange
from seqmesh.parallel.sequence.layout import Layout


@dataclass(frozen=True)
class Part:
    """A contiguous part of a ring position's stream, with its per-document boundaries."""

    start: int
    stop: int
    cu: Tensor
    max_len: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class Block:
    q: Part
    k: Part
    causal: bool
    first: bool  # the first block of its query rows: written, not merged


def ring_parts(layout: Layout, device: torch.device) -> list[tuple[Part, Part]]:
    """(A, B) parts of every ring position, with boundaries on ``device``."""
    parts = []
    for pos in range(layout.ring):
        p = layout.ring_position(pos)
        cu = [cu_seqlens_table(sizes, device) for sizes in (p.a, p.b)]
        parts.append((Part(0, p.len_a, cu[0], max(p.a)), Part(p.len_a, p.len_a + p.len_b, cu[1], max(p.b))))
    return parts


def blocks(parts: list[tuple[Part, Part]], r: int, s: int, causal: bool) -> list[Block]:
    """The kernel calls of ring position ``r`` against the K/V of position ``s``; key parts are
    relative to ``s``'s stream, query parts to ``r``'s."""
    (qa, qb), (ka, kb) = parts[r], parts[s]
    if s == r:
        diag = [Block(qa, ka, causal, True), Block(qb, kb, causal, True), Block(qb, ka, False, False)]
        return diag if causal else diag + [Block(qa, kb, False, False)]
    if not causal:
        return [Block(q, k, False, False) for q in (qa, qb) for k in (ka, kb)]
    if s < r:
        return [Block(qa, ka, False, False), Block(qb, ka, False, False)]
    return [Block(qb, ka, False, False), Block(qb, kb, False, False)]


def _kv_numel(parts: list[tuple[Part, Part]], pos: int, heads: int, dim: int) -> int:
    return 2 * parts[pos][1].stop * heads * dim


def _unpack(kv: Tensor, n: int, heads: int, dim: int) -> tuple[Tensor, Tensor]:
    k, v = kv.view(2, n, heads, dim).unbind(0)
    return k, v


class _ZigzagRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, parts, r, next_rank, prev_rank, group, causal, scale, backend):
        world, (s_len, heads, dim) = len(parts), k.shape
        kv = torch.cat([k.reshape(-1), v.reshape(-1)])
        buf_numel = max(_kv_numel(parts, p, heads, dim) for p in range(world))
        bufs = [kv.new_empty(buf_numel) for _ in range(2)]
        comm = RingExchange(next_rank, prev_rank, group, tag=0)
        acc_out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        cur = kv
        for t in range(world):
            s = (r - t) % world
            if t + 1 < world:
                nxt = bufs[t % 2][:_kv_numel(parts, (s - 1) % world, heads, dim)]
                comm.start(cur, nxt)
            ks, vs = _unpack(cur, parts[s][1].stop, heads, dim)
            for b in blocks(parts, r, s, causal):
                o, lse = attention_forward(q[b.q.rows], ks[b.k.rows], vs[b.k.rows], b.q.cu, b.k.cu, b.q.max_len,
                                           b.k.max_len, causal=b.causal, scale=scale, backend=backend)
                if b.first:
                    acc_out[b.q.rows] = o
                    acc_lse[:, b.q.rows] = lse
                else:
                    merge_partial(acc_out[b.q.rows], acc_lse[:, b.q.rows], o, lse)
            if t + 1 < world:
                comm.wait()
                cur = nxt
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.args = (parts, r, next_rank, prev_rank, group, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        parts, r, next_rank, prev_rank, group, causal, scale, backend = ctx.args
        world, (s_len, heads, dim) = len(parts), k.shape
        dout = dout.contiguous()
        kv = torch.cat([k.reshape(-1), v.reshape(-1)])
        buf_numel = max(_kv_numel(parts, p, heads, dim) for p in range(world))
        kv_bufs = [kv.new_empty(buf_numel) for _ in range(2)]
        dkv_bufs = [torch.empty(buf_numel, dtype=torch.float32, device=q.device) for _ in range(2)]
        kv_comm = RingExchange(next_rank, prev_rank, group, tag=0)
        dkv_comm = RingExchange(next_rank, prev_rank, group, tag=1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        cur = kv
        received = None
        for t in range(world):
            s = (r - t) % world
            prev_numel = _kv_numel(parts, (s - 1) % world, heads, dim)
            if t + 1 < world:
                nxt = kv_bufs[t % 2][:prev_numel]
                kv_comm.start(cur, nxt)
            n = parts[s][1].stop
            ks, vs = _unpack(cur, n, heads, dim)
            dkv = torch.zeros(2 * n * heads * dim, dtype=torch.float32, device=q.device)
            dks, dvs = _unpack(dkv, n, heads, dim)
            for b in blocks(parts, r, s, causal):
                gq, gk, gv = attention_backward(dout[b.q.rows], q[b.q.rows], ks[b.k.rows], vs[b.k.rows],
                                                out[b.q.rows], lse[:, b.q.rows], b.q.cu, b.k.cu, b.q.max_len,
                                                b.k.max_len, causal=b.causal, scale=scale, backend=backend)
                dq[b.q.rows] += gq
                dks[b.k.rows] += gk
                dvs[b.k.rows] += gv
            if received is not None:
                dkv_comm.wait()
                dkv += received
            if t + 1 < world:
                received = dkv_bufs[t % 2][:prev_numel]
                dkv_comm.start(dkv, received)
            else:  # the last hop carries finished sums, which the owner rounds to k's dtype anyway
                received = kv.new_empty(prev_numel)
                dkv_comm.start(dkv.to(kv.dtype), received)
            if t + 1 < world:
                kv_comm.wait()
                cur = nxt
        dkv_comm.wait()
        dk, dv = _unpack(received, s_len, heads, dim)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, parts: list[tuple[Part, Part]], r: int, next_rank: int,
                   prev_rank: int, group: dist.ProcessGroup, causal: bool, scale: float, backend: str) -> Tensor:
    """Attention of ring position ``r``'s stream (q ``[S, Hq, D]``, k/v ``[S, Hkv, D]``) against
    every document's keys across the ring; ``next_rank``/``prev_rank`` are global ranks."""
    return _ZigzagRingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), parts, r, next_rank,
                                      prev_rank, group, causal, scale, backend)
