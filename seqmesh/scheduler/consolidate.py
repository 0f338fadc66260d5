"""Consolidation of the wide level: a long sequence joins a wider group's micro-batch when that
frees more room for the single-rank level than it takes.

When beta is large, a wide group's ranks often have a few hundred ms left after its long sequence:
too little for a micro-batch of their own (one more beta), so the refill (``greedy.refill``) lets
short sequences ride along there; at 64-128 ranks a short sequence's all-to-all makes it cost
3x its single-rank time. A long sequence of a narrower group pays far less for the width (its
attention dominates its all-to-all), and moving it frees its own group's ranks, beta and all, for
the single-rank level. On real Wikipedia lengths at 1024 ranks (FlexSP's GPT-7B model, batch 2)
consolidating (chiefly: long sequences of 16- and 32-rank groups into the 128-rank group of a
179K-token one) brings the plan from 2.9% to 1.1% over the certified bound. Which moves pay is judged by a fluid count of
the single-rank level's room (``_Fluid.tokens``): per rank, the short-sequence tokens its own
micro-batches or a ride in its group would take within the target step time, the same count
``greedy.refill`` deals by. The refill then deals the single-rank level for real, and the
caller keeps the result only when it is faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seqmesh.scheduler.instance import Instance, Schedule


@dataclass
class _Fluid:
    """What the single-rank level's room is counted with: one rank's micro-batch memory and beta,
    the short sequences' mean ms per token on one rank, and the most micro-batches a rank takes."""

    cap: int
    beta: float
    ms_per_token: float
    max_count: int

    def own(self, room: np.ndarray) -> np.ndarray:
        """Tokens a rank's own micro-batches hold within ``room`` (nominal ms), at the best count."""
        c = np.arange(1, self.max_count + 1)
        tok = np.minimum(c * self.cap, (np.asarray(room, dtype=np.float64)[..., None] - c * self.beta) / self.ms_per_token)
        return np.maximum(tok.max(axis=-1), 0.0)

    def tokens(self, room: np.ndarray, free: np.ndarray, rate: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Per rank of a ``d``-rank block with ``free`` tokens of micro-batch memory: its own
        micro-batches at the best count (from none up), and a ride in the block (``rate`` ms per
        token per rank at that width) with the time they leave; riding pays no beta but the
        block's all-to-all, so a rank rides only where its own micro-batches run out of memory."""
        room = np.maximum(np.asarray(room, dtype=np.float64), 0.0)[..., None]
        c = np.arange(0, self.max_count + 1)
        spend = np.maximum(room - c * self.beta, 0.0)
        own = np.minimum(c * self.cap, spend / self.ms_per_token) * (room >= c * self.beta)
        left = np.maximum(spend - own * self.ms_per_token, 0.0) * (room >= c * self.beta)
        ride = np.minimum(left / np.asarray(rate)[..., None], np.asarray(free, dtype=np.float64)[..., None]) \
            / np.asarray(d, dtype=np.float64)[..., None]
        return (own + np.maximum(ride, 0.0)).max(axis=-1)


class _Blocks:
    """The wide blocks as arrays: per block its pace, free micro-batch memory and short-sequence
    rate (ms per token per rank), each rank's finish of the wide level, and the fluid step time
    ``target`` the moves are judged at."""

    def __init__(self, inst: Instance, wide: Schedule, above: np.ndarray, short_ids: np.ndarray) -> None:
        self.inst, self.short_ids = inst, short_ids
        self.wide = {blk: [list(ids) for ids in mbs if ids] for blk, mbs in wide.items() if any(mbs)}
        self.above = above.astype(np.float64).copy()
        self.target = 0.0
        self._index()

    def _index(self) -> None:
        """The per-block arrays, from ``wide`` (again after a block is added)."""
        inst, short_ids = self.inst, self.short_ids
        self.keys = sorted(self.wide, key=lambda b: (-b[1], b[0]))
        tokens = max(float(inst.lengths[short_ids].sum()), 1.0)
        self.rate = np.array([max(float(inst.t(d, f)[short_ids].sum()) / tokens, 1e-12) for f, d in self.keys])
        self.pace = np.array([float(inst.block_speed[d][f // d]) for f, d in self.keys])
        self.d = np.array([d for _, d in self.keys], dtype=np.float64)
        self.free = np.array([sum(inst.capacity[d] - int(inst.lengths[ids].sum()) for ids in self.wide[(f, d)])
                              for f, d in self.keys], dtype=np.float64)
        self.ranks = np.concatenate([np.arange(f, f + d) for f, d in self.keys]) if self.keys else np.zeros(0, np.int64)
        self.owner = np.repeat(np.arange(len(self.keys)), [d for _, d in self.keys])

    def widen_late(self) -> None:
        """Move the longest sequence of each block that ends after the target into a new block of the
        narrowest wider size, on ranks no wide block uses, where that ends by the target (the first
        such block): the single-rank level can end by the target, so such a block would end the step."""
        inst = self.inst
        for f, d in list(self.keys):
            bins = self.wide[(f, d)]
            if not bins or float(self.above[f:f + d].max()) <= self.target:
                continue
            used = np.zeros(inst.gpus, dtype=bool)
            for (g, w), mbs in self.wide.items():
                used[g:g + w] |= bool(mbs)
            t = inst.t(d, f)
            i = max((i for ids in bins for i in ids), key=lambda i: (float(t[i]), -i))
            for w in (w for w in inst.sizes if w > d):
                free = ~used[: (inst.gpus // w) * w].reshape(-1, w).any(axis=1)
                item = inst.block_times(w, i) + inst.beta
                ends = np.where(free, self.above[: (inst.gpus // w) * w].reshape(-1, w).max(axis=1)
                                + item / inst.block_speed[w], np.inf)
                if ends.min() <= self.target:
                    self._move_to_new(i, (f, d), (int(np.argmin(ends)) * w, w))
                    break
        self._index()

    def _move_to_new(self, i: int, src: tuple[int, int], dst: tuple[int, int]) -> None:
        """Move sequence ``i`` from block ``src`` to a micro-batch of its own in the new block ``dst``."""
        (fs, ds), (fd, dd) = src, dst
        bins = self.wide[src]
        k = next(k for k, ids in enumerate(bins) if i in ids)
        saved = float(self.inst.t(ds, fs)[i]) + (self.inst.beta if len(bins[k]) == 1 else 0.0)
        bins[k].remove(i)
        self.wide[src] = [ids for ids in bins if ids]
        self.above[fs:fs + ds] -= saved / float(self.inst.block_speed[ds][fs // ds])
        self.wide[dst] = [[i]]
        self.above[fd:fd + dd] += (float(self.inst.t(dd, fd)[i]) + self.inst.beta) / float(self.inst.block_speed[dd][fd // dd])

    def room(self, b: int) -> float:
        """Block ``b``'s ranks' time before the target (nominal ms at the block's pace)."""
        f, d = self.keys[b]
        return (self.target - float(self.above[f:f + d].max())) * float(self.pace[b])

    def tokens(self, fluid: _Fluid, target_ms: float) -> float:
        """Short-sequence tokens all ranks take within ``target_ms``: each rank its own micro-batches,
        or those and a ride in one of its blocks, whichever takes more."""
        best = fluid.own(np.maximum((target_ms - self.above) * self.inst.block_speed[1], 0.0))
        if self.keys:
            start = np.maximum.reduceat(self.above[self.ranks], np.concatenate([[0], np.cumsum(self.d)[:-1]]).astype(np.int64))
            room = np.maximum((target_ms - start) * self.pace, 0.0)
            mine = fluid.tokens(room, self.free, self.rate, self.d)
            np.maximum.at(best, self.ranks, mine[self.owner])
        return float(best.sum())

    def fluid_target(self, fluid: _Fluid, tokens: float, hi_ms: float) -> float:
        """The least step time whose room takes ``tokens`` short-sequence tokens (bisection, 0.01%);
        inf when no step time up to 1024x ``hi_ms`` does (the room is capped by micro-batch counts)."""
        lo, hi = 0.0, hi_ms
        for _ in range(10):
            if self.tokens(fluid, hi) >= tokens:
                break
            lo, hi = hi, 2 * hi
        else:
            return math.inf
        while hi - lo > 1e-4 * hi:
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.tokens(fluid, mid) < tokens else (lo, mid)
        return hi

    def sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every long sequence with its block index and whether it is alone in its micro-batch."""
        ids, blk, alone = [], [], []
        for b, key in enumerate(self.keys):
            for mb in self.wide[key]:
                ids.extend(mb)
                blk.extend([b] * len(mb))
                alone.extend([len(mb) == 1] * len(mb))
        return np.asarray(ids, dtype=np.int64), np.asarray(blk, dtype=np.int64), np.asarray(alone, dtype=bool)

    def move(self, i: int, src: int, dst: int, mb: int) -> None:
        """Move sequence ``i`` from block ``src`` to micro-batch ``mb`` of block ``dst``; the ranks'
        finish shifts by what each block gains or loses (exact for blocks that do not nest)."""
        (fs, ds), (fd, dd) = self.keys[src], self.keys[dst]
        n = int(self.inst.lengths[i])
        bins = self.wide[(fs, ds)]
        k = next(k for k, ids in enumerate(bins) if i in ids)
        alone = len(bins[k]) == 1
        saved = float(self.inst.t(ds, fs)[i]) + (self.inst.beta if alone else 0.0)
        bins[k].remove(i)
        self.wide[(fs, ds)] = [ids for ids in bins if ids]
        self.free[src] += n - (self.inst.capacity[ds] if alone else 0)
        self.above[fs:fs + ds] -= saved / float(self.pace[src])
        self.wide[(fd, dd)][mb].append(i)
        self.free[dst] -= n
        self.above[fd:fd + dd] += float(self.inst.t(dd, fd)[i]) / float(self.pace[dst])

    def schedule(self) -> Schedule:
        """The wide level as it now stands (blocks left empty dropped)."""
        return {blk: mbs for blk, mbs in self.wide.items() if mbs}


def consolidate(inst: Instance, wide: Schedule, above: np.ndarray, target_ms: float,
                short_ids: np.ndarray, max_count: int) -> Schedule:
    """``wide`` (blocks of two or more ranks, no short riders) with long sequences moved into wider
    blocks' micro-batches with room wherever that adds to the single-rank level's room
    (``above``: each rank's finish of the wide level alone; ``target_ms``: a reachable step time).

    Moves are judged at the fluid step time (the least one whose room takes every short sequence),
    lowered by each move's gain over the room's growth per ms, and a destination block must still
    end by it: filling wide blocks up to a step time the single-rank level then beats would make
    them the step's end. Destinations are taken widest first (the widest groups pay most for short
    riders); into each micro-batch, the move that adds the most room is made while one adds any.
    Passes of such moves run while the estimate (the fluid step time, or the wide level's end if
    later) falls, each keeping every block within the last one's estimate (``_PASSES``). Returns
    the best pass's wide level, or ``wide`` itself when none lowers the estimate.
    Deterministic: fixed orders, index tie-breaks.
    """
    if not short_ids.size:
        return wide
    ms_per_token = max(float(inst.times[1][short_ids].sum()) / float(inst.lengths[short_ids].sum()), 1e-12)
    fluid = _Fluid(inst.capacity[1], inst.beta, ms_per_token, max_count)
    need = float(inst.lengths[short_ids].sum())
    placed = _Blocks(inst, wide, above, short_ids)
    before = max(placed.fluid_target(fluid, need, target_ms), float(above.max()))
    if not math.isfinite(before):
        return wide
    best = (before * (1 - 1e-9), wide)
    end_cap = math.inf
    for _ in range(_PASSES):
        found = _pass(_Blocks(inst, wide, above, short_ids), fluid, need, target_ms, end_cap)
        if found is None or found[0] >= best[0]:
            break
        end_cap, best = found[0], found
    return best[1]


# Passes of moves, while the estimated step falls: the first fills the widest blocks up to the
# fluid step time as it stands when they are visited, before the later moves lower it, so those
# blocks end the step (1% of it on real Wikipedia lengths at 1024 ranks); each next pass keeps
# every block within the last one's estimate. Each costs ~40 ms at 1024 ranks x 8192.
_PASSES = 4


def _pass(blocks: _Blocks, fluid: _Fluid, need: float, target_ms: float,
          end_cap: float) -> tuple[float, Schedule] | None:
    """One pass of moves (see ``consolidate``), no block ending after ``end_cap``: the estimated
    step (the fluid step time, or the wide level's end if later) and the wide level it leaves."""
    inst = blocks.inst
    blocks.target = min(blocks.fluid_target(fluid, need, target_ms), end_cap)
    if not math.isfinite(blocks.target):
        return None
    blocks.widen_late()
    blocks.target = min(blocks.fluid_target(fluid, need, target_ms), end_cap)
    step = 1e-3 * blocks.target
    slope = (blocks.tokens(fluid, blocks.target + step) - blocks.tokens(fluid, blocks.target)) / step
    if not math.isfinite(blocks.target) or slope <= 0:
        return None
    for dst, (fd, dd) in enumerate(blocks.keys):
        for mb in range(len(blocks.wide[(fd, dd)])):
            while (gain := _best_move(inst, fluid, blocks, dst, mb)) > 0:
                blocks.target -= gain / slope
    return max(blocks.fluid_target(fluid, need, target_ms), float(blocks.above.max())), blocks.schedule()


def _best_move(inst: Instance, fluid: _Fluid, blocks: _Blocks, dst: int, mb: int) -> float:
    """Make the move into micro-batch ``mb`` of block ``dst`` that adds the most single-rank room
    (tokens), if one adds any and the block still ends by the target; returns the room added."""
    fd, dd = blocks.keys[dst]
    ids, src, alone = blocks.sequences()
    free_mb = inst.capacity[dd] - int(inst.lengths[blocks.wide[(fd, dd)][mb]].sum())
    room_dst = blocks.room(dst)
    add = inst.t(dd, fd)[ids]
    ok = (blocks.d[src] < dd) & (inst.lengths[ids] <= free_mb) & (add <= room_dst)
    if not ok.any():
        return 0.0
    ids, src, alone, add = ids[ok], src[ok], alone[ok], add[ok]
    n = inst.lengths[ids].astype(np.float64)
    d_src = blocks.d[src]
    room_src = np.array([blocks.room(b) for b in src.tolist()])
    free_src = blocks.free[src]
    cap_src = np.array([inst.capacity[int(d)] for d in d_src], dtype=np.float64)
    t_src = np.array([float(inst.t(int(blocks.keys[b][1]), blocks.keys[b][0])[i]) for b, i in zip(src.tolist(), ids.tolist())])
    saved = t_src + inst.beta * alone
    free_after = np.where(alone, free_src - (cap_src - n), free_src + n)
    rate_src = blocks.rate[src]
    gain_src = d_src * (fluid.tokens(room_src + saved, free_after, rate_src, d_src)
                        - fluid.tokens(room_src, free_src, rate_src, d_src))
    free_dst, rate_dst = blocks.free[dst], blocks.rate[dst]
    before_dst = float(fluid.tokens(np.array(room_dst), np.array(free_dst), rate_dst, np.array(dd)))
    gain_dst = dd * (fluid.tokens(room_dst - add, free_dst - n, np.full(n.size, rate_dst), np.full(n.size, dd))
                     - before_dst)
    gain = gain_src + gain_dst
    k = int(np.lexsort((ids, -gain))[0])
    if gain[k] <= 1e-9 * fluid.cap:
        return 0.0
    blocks.move(int(ids[k]), int(src[k]), dst, mb)
    return float(gain[k])
