"""TokenRing: bidirectional ring attention over packed variable-length documents (zigzag layout).

A K/V ring (``ring.py``) sends every byte one way round; the reverse direction of each link idles.
TokenRing (Li et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication") keeps K/V where they live and moves the queries instead: at step
``t`` ring position ``r`` holds the queries of position ``s = r + t`` (they move one hop towards
``r - 1`` per step), attends them to its own K/V, and sends the block's result straight back to
``s`` over the full mesh. Every step posts one batch with the next queries (one way round) and
the previous step's block result (the other way), both in flight while the current block
computes, so both directions of the links carry data.

Zigzag balance (``layout``): the holder ``r`` of ``s``'s queries needs both of their parts when
``r < s`` (against its part A only) and only part B when ``r > s`` (against both its parts; part A
precedes all it holds), so a query pack drops part A where it wraps from position 0 to ``W - 1``,
and a block result covers only the rows its holder attended. Every step costs every rank the same
two chunk blocks. Of the local diagonal, the causal blocks run at step 0 (while the first queries
arrive) and the rest at the end (while the last block result travels home), so neither transfer
waits alone.

Forward: block outputs travel in the input dtype (what the kernel returned, merged over the
holder's two blocks in fp32 first) with their LSE in fp32; the owner merges them in fp32. Backward,
the same schedule: ``(q, dout, out, lse)`` travel with the queries; the holder adds the block's
dK/dV to its own fp32 accumulators (K/V and their gradients never move) and sends the block's dQ to
the owner, which sums them in fp32. Each partial is rounded to the input dtype once, on its one hop.

When it pays: per token and step (before part B trimming, which spares about a quarter), the ring
sends ``2 Hkv D`` elements of K/V one way; TokenRing sends ``Hq D`` of queries one way and as much
output (plus ``Hq`` fp32 LSE) the other. In the backward the ring sends K/V plus fp32 dK/dV (the
bytes of ``6 Hkv D`` elements) one way; TokenRing ``3 Hq D`` (+ LSE) one way and ``Hq D`` of dQ the
other. So with multi-head attention each direction carries less than the ring's one, while with
GQA of four query heads per KV head (Llama-8B) it carries more: the choice belongs to a cost model
that knows the head shapes and links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from seqmesh.kernels.attention import attention_backward, attention_forward
from seqmesh.parallel.sequence.comm import Pending
from seqmesh.parallel.sequence.ring import Block, Part, blocks

_RESULT_TAG = 8  # tags 0.. carry the query pack, 8.. the block result (gloo matches by tag)


@dataclass(frozen=True)
class _Ring:
    """Positions, peers and the zigzag row rule of one TokenRing column."""

    parts: list[tuple[Part, Part]]
    pos: int
    ranks: Sequence[int]  # global rank of every ring position
    group: dist.ProcessGroup
    causal: bool

    @property
    def world(self) -> int:
        return len(self.parts)

    def base(self, s: int, holder: int) -> int:
        """First row of ``s``'s stream that position ``holder`` attends (part B starts at part A's end)."""
        return 0 if not self.causal or holder <= s else self.parts[s][0].stop

    def rows(self, s: int) -> int:
        return self.parts[s][1].stop

    def diagonal(self) -> tuple[list[Block], list[Block]]:
        """The local blocks: those that first write rows (causal, every row sees itself) and the rest."""
        diag = blocks(self.parts, self.pos, self.pos, self.causal)
        return [b for b in diag if b.first], [b for b in diag if not b.first]


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """acc <- softmax-weighted combination of acc and a block, in place, in fp32. Either side may
    have LSE -inf (no keys yet, or none in the block): accumulators here start empty."""
    new = torch.logaddexp(acc_lse, lse)
    weight = torch.exp(lse - new).nan_to_num_(0.0)  # nan only where both are -inf: nothing to add
    acc_out.lerp_(out.float(), weight.t().unsqueeze(-1))
    acc_lse.copy_(new)


def _rows(b: Block, base: int) -> slice:
    return slice(b.q.start - base, b.q.stop - base)


def _p2p(op: Callable, tensors: Sequence[Tensor], peer: int, group: dist.ProcessGroup, tag: int) -> list:
    # Every rank knows every size, so an empty tensor is skipped by both of its ends.
    return [dist.P2POp(op, t, peer, group, tag=tag + i) for i, t in enumerate(tensors) if t.numel()]


def _circulate(ring: _Ring, pack: list[Tensor], result_spec: list[tuple[tuple[int, ...], torch.dtype]],
               work: Callable[[int, int, list[Tensor]], list[Tensor]], absorb: Callable[[int, list[Tensor]], None],
               local: Callable[[list[Block]], None]) -> None:
    """The TokenRing schedule, shared by forward and backward.

    ``pack``: this position's row-major tensors that travel with its queries (rows = its stream).
    ``work(s, base, pack_rows)``: the blocks of ``s``'s rows ``[base, end)`` against the local K/V;
    returns the block result (row-major, rows from ``base``; shapes and dtypes ``result_spec`` per
    row) for ``s``. ``absorb(base, result)`` takes a result for this position's rows ``[base, end)``.
    ``local(blocks)`` runs diagonal blocks on the own pack.
    """
    world, r = ring.world, ring.pos
    prev, nxt = ring.ranks[(r - 1) % world], ring.ranks[(r + 1) % world]
    longest = max(ring.rows(s) for s in range(world))
    bufs = [[x.new_empty(longest, *x.shape[1:]) for x in pack] for _ in range(min(2, world - 1))]
    inbox = [torch.empty(longest, *shape, dtype=dtype, device=pack[0].device) for shape, dtype in result_spec]
    first, rest = ring.diagonal()
    cur, cur_base, outgoing = pack, 0, None
    for t in range(world + 1):  # step ``world``: the last block result goes home while the diagonal's rest runs
        ops = []
        if t + 1 < world:
            held, coming = (r + t) % world, (r + t + 1) % world
            send_from = ring.base(held, (r - 1) % world) - cur_base
            nxt_base = ring.base(coming, r)
            nxt_pack = [b[:ring.rows(coming) - nxt_base] for b in bufs[t % 2]]
            ops += _p2p(dist.isend, [x[send_from:] for x in cur], prev, ring.group, 0)
            ops += _p2p(dist.irecv, nxt_pack, nxt, ring.group, 0)
        if outgoing is not None:
            ops += _p2p(dist.isend, outgoing[0], outgoing[1], ring.group, _RESULT_TAG)
        if t >= 2:
            holder = (r - t + 1) % world
            in_base = ring.base(r, holder)
            incoming = [x[:ring.rows(r) - in_base] for x in inbox]
            ops += _p2p(dist.irecv, incoming, ring.ranks[holder], ring.group, _RESULT_TAG)
        pending = Pending(dist.batch_isend_irecv(ops) if ops else [], [op.tensor for op in ops])
        if t == 0:
            local(first)
        elif t < world:
            s = (r + t) % world
            outgoing = (work(s, cur_base, cur), ring.ranks[s])
        else:
            local(rest)
        pending.wait()
        if t >= 2:
            absorb(in_base, incoming)
        if t + 1 < world:
            cur, cur_base = nxt_pack, nxt_base


class _TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, scale, backend):
        (s_len, hq, dim), dtype = q.shape, q.dtype
        acc_out = q.new_zeros(q.shape, dtype=torch.float32)
        acc_lse = torch.full((hq, s_len), -torch.inf, dtype=torch.float32, device=q.device)

        def attend(b: Block, qs: Tensor) -> tuple[Tensor, Tensor]:
            return attention_forward(qs, k[b.k.rows], v[b.k.rows], b.q.cu, b.k.cu, b.q.max_len, b.k.max_len,
                                     causal=b.causal, scale=scale, backend=backend)

        def local(diag: list[Block]) -> None:
            for b in diag:
                _merge(acc_out[b.q.rows], acc_lse[:, b.q.rows], *attend(b, q[b.q.rows]))

        def work(s: int, base: int, pack: list[Tensor]) -> list[Tensor]:
            qs = pack[0]
            out = qs.new_zeros(qs.shape, dtype=torch.float32)
            lse = torch.full((hq, qs.shape[0]), -torch.inf, dtype=torch.float32, device=qs.device)
            for b in blocks(ring.parts, s, ring.pos, ring.causal):
                rows = _rows(b, base)
                _merge(out[rows], lse[:, rows], *attend(b, qs[rows]))
            return [out.to(dtype), lse.t().contiguous()]

        def absorb(base: int, result: list[Tensor]) -> None:
            _merge(acc_out[base:], acc_lse[:, base:], result[0], result[1].t())

        _circulate(ring, [q], [((hq, dim), dtype), ((hq,), torch.float32)], work, absorb, local)
        out = acc_out.to(dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse.t().contiguous())
        ctx.args = (ring, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse_rows = ctx.saved_tensors
        ring, scale, backend = ctx.args
        (_, hq, dim), dtype = q.shape, q.dtype
        dq = q.new_zeros(q.shape, dtype=torch.float32)
        dk, dv = (x.new_zeros(x.shape, dtype=torch.float32) for x in (k, v))

        def grads(b: Block, pack: list[Tensor], rows: slice) -> Tensor:
            qs, dos, outs, lses = (x[rows] for x in pack)
            gq, gk, gv = attention_backward(dos, qs, k[b.k.rows], v[b.k.rows], outs, lses.t(), b.q.cu, b.k.cu,
                                            b.q.max_len, b.k.max_len, causal=b.causal, scale=scale, backend=backend)
            dk[b.k.rows] += gk
            dv[b.k.rows] += gv
            return gq

        own = [q, dout.contiguous(), out, lse_rows]

        def local(diag: list[Block]) -> None:
            for b in diag:
                dq[b.q.rows] += grads(b, own, b.q.rows)

        def work(s: int, base: int, pack: list[Tensor]) -> list[Tensor]:
            part = pack[0].new_zeros(pack[0].shape, dtype=torch.float32)
            for b in blocks(ring.parts, s, ring.pos, ring.causal):
                rows = _rows(b, base)
                part[rows] += grads(b, pack, rows)
            return [part.to(dtype)]

        def absorb(base: int, result: list[Tensor]) -> None:
            dq[base:] += result[0]

        _circulate(ring, own, [((hq, dim), dtype)], work, absorb, local)
        return dq.to(dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def tokenring_attention(q: Tensor, k: Tensor, v: Tensor, parts: list[tuple[Part, Part]], pos: int,
                        ranks: Sequence[int], group: dist.ProcessGroup, causal: bool, scale: float,
                        backend: str) -> Tensor:
    """Attention of ring position ``pos``'s zigzag stream (q ``[S, Hq, D]``, k/v ``[S, Hkv, D]``)
    against every document's keys across the ring; ``ranks`` are the global ranks of all ring
    positions (block results go straight to their owner, not hop by hop)."""
    ring = _Ring(parts, pos, tuple(ranks), group, causal)
    return _TokenRingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), ring, scale, backend)
