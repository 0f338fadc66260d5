"""The fast planner: choose SP degrees, place longest-first, then repair the busiest rank.

1. **Degrees.** For a target step time ``T``, each sequence takes the smallest allowed group that
   holds it and runs it within ``T`` (the fastest group when none does): short sequences stay on
   one rank (no communication at all), long ones spread only as far as the target forces. The
   target is the balance point where the resulting work just fits ``T`` on every rank; a few
   targets around it are tried and the best placement wins.
2. **Placement** (LPT, Graham 1969), level by level from the largest group size down: each
   sequence goes to the block of its size that would finish it earliest, into its fullest
   micro-batch with room (best fit), opening a micro-batch (one more beta) only when that still
   finishes first; a long sequence that would overrun the target there is widened (see ``place``).
3. **Repair** (local search on the single-rank level, where nearly all sequences live): move a
   sequence off the rank that finishes last, or swap it for a shorter one elsewhere, while that
   lowers the step time; memory is checked for every move.
4. **Refill** (``refill``; without pipeline stages), which matters when beta is large: LPT opens
   a micro-batch wherever a sequence ends earliest, so ranks end up with three micro-batches
   (three betas) where two would hold their tokens. The wider blocks stay, the single-rank level is dealt again with each rank's count of
   micro-batches chosen for the time it has left, and what overflows rides along in a wider
   micro-batch or opens one; repaired, it replaces the answer of 1-3 only when faster.
   Before the deal, the wide level is **consolidated** (seqmesh.scheduler.consolidate): long
   sequences join wider groups' micro-batches where their time left would otherwise go to short
   riders (3x their cost at 64-128 ranks), freeing their own groups' ranks, and a wide block that
   would end after the rest of the step moves its longest sequence to a wider block of idle ranks;
   kept where a fluid count of the single-rank level's room says the step gets shorter.

With pipeline stages (``pp > 1``) a rank's step also pays the fill and drain of its largest
micro-batch (seqmesh.scheduler.simulate), so a sequence's degree is chosen for ``pp`` times its
stage time (what it costs alone), candidates are compared by that pipelined makespan, and the
winner's micro-batches are re-split per block (``pipeline_repack``): more, smaller micro-batches
shrink the fill and drain, each one more costs a beta.

Everything is a deterministic function of the input (stable orders, index tie-breaks).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from seqmesh.scheduler.consolidate import consolidate
from seqmesh.scheduler.instance import Instance, Schedule


def degrees_for(inst: Instance, target_ms: float) -> np.ndarray:
    """Per sequence, the smallest allowed size >= its memory minimum whose time fits ``target_ms``
    (alone, through all ``pp`` stages)."""
    n = inst.lengths.size
    deg = np.zeros(n, dtype=np.int64)
    best_t = np.full(n, np.inf)
    fastest = np.zeros(n, dtype=np.int64)
    for d in inst.sizes:
        ok = inst.dmin <= d
        t = inst.times[d] + inst.beta
        deg = np.where((deg == 0) & ok & (t * inst.pp <= target_ms), d, deg)
        better = ok & (t < best_t)
        best_t = np.where(better, t, best_t)
        fastest = np.where(better, d, fastest)
    return np.where(deg == 0, fastest, deg)


class _Level:
    """The blocks of one size: their micro-batches (bins) as sequences are dealt to them."""

    def __init__(self, inst: Instance, d: int) -> None:
        nb = inst.gpus // d
        self.d, self.cap, self.nb = d, inst.capacity[d], nb
        self.speed = inst.block_speed[d]
        self.most_free = np.zeros(nb, dtype=np.int64)
        self.bins: list[list[list]] = [[] for _ in range(nb)]  # per block: [free tokens, ids]
        # the earliest block start seen by the last ``best``: finish times only grow while placing,
        # so it stays a lower bound, and widening skips a level that cannot end in time without
        # pricing every block again (at 1024 ranks nearly every short sequence asks, ~1% succeed)
        self.start_floor = 0.0
        self.fastest = float(self.speed.max())

    def starts(self, per_rank: np.ndarray) -> np.ndarray:
        """Per block, the largest of ``per_rank`` over its ranks (when all of them are free)."""
        if self.d == 1:
            return per_rank[: self.nb]
        return per_rank[: self.nb * self.d].reshape(self.nb, self.d).max(axis=1)

    def best(self, fin: np.ndarray, n: int, t: np.ndarray, beta: float,
             drain: _Drain | None = None) -> tuple[int, float]:
        """The block that would finish a sequence (n tokens, ``t`` ms on each block) earliest, and that finish time."""
        start = self.starts(fin)
        self.start_floor = float(start.min())
        finish = start + (t + beta * (self.most_free < n)) / self.speed
        if drain is not None:
            finish = finish + drain.cost(self, t + beta)
        b = int(np.argmin(finish))
        return b, float(finish[b])

    def best_open(self, fin: np.ndarray, n: int, t: np.ndarray, drain: _Drain | None = None) -> tuple[int, float]:
        """Like ``best``, but only among blocks with a micro-batch that has room (no new beta)."""
        room = self.most_free >= n
        if not room.any():
            return -1, np.inf
        finish = self.starts(fin) + t / self.speed
        if drain is not None:
            finish = finish + drain.cost(self, t + drain.beta)
        finish = np.where(room, finish, np.inf)
        b = int(np.argmin(finish))
        return b, float(finish[b])

    def add(self, b: int, i: int, n: int, t: float, beta: float, fin: np.ndarray) -> None:
        """Put sequence ``i`` in block ``b``'s fullest micro-batch with room (or a new one)."""
        fitting = [k for k, (free, _) in enumerate(self.bins[b]) if free >= n]
        if fitting:
            k = min(fitting, key=lambda k: (self.bins[b][k][0], k))
        else:
            self.bins[b].append([self.cap, []])
            k = len(self.bins[b]) - 1
            t += beta
        self.bins[b][k][0] -= n
        self.bins[b][k][1].append(i)
        self.most_free[b] = max(free for free, _ in self.bins[b])
        lo = b * self.d
        fin[lo:lo + self.d] = fin[lo:lo + self.d].max() + t / self.speed[b]


class _Drain:
    """Under PP, each rank's pipeline fill and drain as sequences are placed: ``pp - 1`` times the
    stage time of its largest sequence (alone in its micro-batch, the least its largest micro-batch
    can be once ``pipeline_repack`` splits the rest to that size)."""

    def __init__(self, inst: Instance) -> None:
        self.factor, self.beta = inst.pp - 1, inst.beta
        self.peak = np.zeros(inst.gpus)

    def cost(self, level: _Level, item_ms: np.ndarray) -> np.ndarray:
        """Each block's fill and drain if it took a sequence whose micro-batch alone takes ``item_ms``."""
        return self.factor * np.maximum(level.starts(self.peak), item_ms / level.speed)

    def add(self, level: _Level, b: int, item_ms: float) -> None:
        ranks = slice(b * level.d, (b + 1) * level.d)
        self.peak[ranks] = np.maximum(self.peak[ranks], item_ms / level.speed[b])


_SCAN = 16
_LONG = 0.25
_REPAIR_STEPS = 4096  # local-search moves (each O(ranks)); at 1024 ranks x 8192 the repair still gains 7% past 256


class _RankHeap:
    """Single-rank placement in O(log ranks) when all ranks run at one pace.

    A rank's key is its finish time plus beta if it has no micro-batch yet (what taking any
    sequence costs it). Entries are (key, rank); a rank whose key changes gets a fresh entry and
    the old one is dropped when it surfaces. The rank with the lowest key wins unless it has
    micro-batches but none with room; then a rank with room less than beta behind it wins
    instead (the earliest among the next _SCAN).
    """

    def __init__(self, level: _Level, fin: np.ndarray, beta: float) -> None:
        self.level, self.beta = level, beta
        self.heap = [(self.key(fin, r), r) for r in range(fin.size)]
        heapq.heapify(self.heap)

    def key(self, fin: np.ndarray, r: int) -> float:
        return float(fin[r]) + (0.0 if self.level.bins[r] else self.beta)

    def _room(self, r: int, n: int) -> bool:
        return not self.level.bins[r] or self.level.most_free[r] >= n

    def _pop(self, fin: np.ndarray, seen: list[int]) -> tuple[float, int] | None:
        while self.heap:
            k, r = heapq.heappop(self.heap)
            if k == self.key(fin, r) and r not in seen:
                seen.append(r)
                return k, r
        return None

    def best(self, fin: np.ndarray, n: int, t: float) -> tuple[int, float]:
        seen: list[int] = []
        first = self._pop(fin, seen)
        if first is None:
            raise RuntimeError("rank heap lost its entries; every rank keeps one current entry")
        popped = [first]
        top_key, top = first
        if not self._room(top, n):
            while self.heap and len(popped) <= _SCAN and self.heap[0][0] < top_key + self.beta:
                nxt = self._pop(fin, seen)
                if nxt is None:
                    break
                popped.append(nxt)
                if self._room(nxt[1], n):
                    break
        for p in popped:
            heapq.heappush(self.heap, p)
        fitting = [p for p in popped if self._room(p[1], n) and p[0] < top_key + self.beta]
        if fitting:
            k, r = min(fitting)
            return r, k + t
        return top, top_key + t + self.beta

    def touch(self, fin: np.ndarray, ranks: range) -> None:
        for r in ranks:
            heapq.heappush(self.heap, (self.key(fin, r), r))


def _opens_bin(level: _Level, b: int, n: int) -> bool:
    return not level.bins[b] or level.most_free[b] < n


def place(inst: Instance, deg: np.ndarray, target_ms: float = np.inf,
          ride_along: bool = False) -> tuple[Schedule, np.ndarray, np.ndarray]:
    """LPT placement, largest degree first; returns (schedule, per-rank finish, finish before size 1).

    Because blocks nest and run largest-first, a rank's finish is the sum of the loads of its
    blocks whatever order they were filled in; so a sequence that would end past ``target_ms``
    at its degree may still move up to a wider block, the narrowest that ends in time (if any):
    this catches the long sequence that would land on ranks already busy with a wide group. With
    ``ride_along``, a sequence that would open a micro-batch (one more beta) joins a wider block's
    open micro-batch instead when that finishes sooner: it wins when few sequences share many
    ranks, and loses (more communication) when many short ones do, so both are tried.
    """
    fin = np.zeros(inst.gpus)
    levels = {d: _Level(inst, d) for d in inst.sizes}
    uniform = bool(np.ptp(inst.speed) == 0)
    beta, lengths = inst.beta, inst.lengths
    drain = _Drain(inst) if inst.pp > 1 else None
    fastest = np.min([inst.times[w] for w in inst.sizes], axis=0) / inst.speed.max()
    for d in sorted({int(x) for x in deg}, reverse=True):
        ids = np.flatnonzero(deg == d)
        ids = ids[np.lexsort((ids, -inst.times[d][ids]))].tolist()
        heap = _RankHeap(levels[1], fin, beta) if d == 1 and uniform and drain is None else None
        for i in ids:
            n = int(lengths[i])
            t = float(inst.times[d][i])
            b, finish = heap.best(fin, n, t) if heap else levels[d].best(fin, n, inst.block_times(d, i), beta, drain)
            chosen = d
            # widen only a sequence that is long for the room left on the emptiest rank: others
            # overflow from packing, not from their length
            floor = fin.min()
            if finish > target_ms and t + beta > _LONG * (target_ms - floor) and floor + fastest[i] <= target_ms:
                for w in (w for w in inst.sizes if w > d):
                    tw = float(inst.times[w][i])
                    if max(floor, levels[w].start_floor) + tw / levels[w].fastest > target_ms:
                        continue
                    bw, fw = levels[w].best(fin, n, inst.block_times(w, i), beta, drain)
                    if fw <= target_ms:
                        chosen, b = w, bw
                        break
            elif ride_along and beta > 0 and _opens_bin(levels[d], b, n):
                # riding along in a wider group's open micro-batch may beat paying a new beta
                for w in (w for w in inst.sizes if w > d):
                    bw, fw = levels[w].best_open(fin, n, inst.block_times(w, i), drain)
                    if fw < finish:
                        chosen, b, finish = w, bw, fw
            t_block = float(inst.t(chosen, b * chosen)[i])
            levels[chosen].add(b, i, n, t_block, beta, fin)
            if drain is not None:
                drain.add(levels[chosen], b, t_block + beta)
            if heap:
                heap.touch(fin, range(b * chosen, (b + 1) * chosen))
    sched: Schedule = {}
    for w, level in levels.items():
        for b, bins in enumerate(level.bins):
            if bins:
                sched[(b * w, w)] = [ids_ for _, ids_ in bins]
    above = fin.copy()
    if 1 in levels:
        for r, bins in enumerate(levels[1].bins):
            if bins:
                load = sum(float(inst.times[1][ids_].sum()) for _, ids_ in bins) + beta * len(bins)
                above[r] -= load / inst.speed[r]
    return sched, fin, above


class _WideBins:
    """The micro-batches of wider blocks as arrays, so a sequence riding along is priced against
    all of them at once: a block's ranks all finish later by the sequence's time at its width
    (blocks nest and run largest-first), so the ride ends at the block's latest rank plus that."""

    def __init__(self, inst: Instance, wide: Schedule) -> None:
        self.inst, self.wide = inst, wide  # the micro-batches' id lists, appended to in place
        blocks = [blk for blk, bins in wide.items() if bins]
        self.blocks = blocks
        self.first = np.array([f for f, _ in blocks], dtype=np.int64)
        self.d = np.array([d for _, d in blocks], dtype=np.int64)
        self.pace = np.array([float(inst.block_speed[d][f // d]) for f, d in blocks])
        # every size's link-pattern rows stacked, so a block's times are one row: its size's offset + its pattern
        offset = np.cumsum([0] + [len(inst.profile_times[d]) for d in inst.sizes])
        self.row = np.array([offset[inst.sizes.index(d)] + inst.profile[d][f // d] for f, d in blocks], dtype=np.int64)
        self.ranks = np.concatenate([np.arange(f, f + d) for f, d in blocks]) if blocks else np.zeros(0, np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.d)[:-1]]).astype(np.int64) if blocks else self.d
        self.mb_block = np.array([b for b, blk in enumerate(blocks) for _ in wide[blk]], dtype=np.int64)
        self.mb_index = np.array([j for blk in blocks for j in range(len(wide[blk]))], dtype=np.int64)
        self.mb_free = np.array([inst.capacity[blk[1]] - int(inst.lengths[ids].sum()) for blk in blocks
                                 for ids in wide[blk]], dtype=np.int64)
        self.times = np.concatenate([inst.profile_times[d] for d in inst.sizes])

    def ride(self, i: int, fin: np.ndarray, beat_ms: float,
             leaving: tuple[int, float] | None = None) -> tuple[int, int, float] | None:
        """Put sequence ``i`` in the micro-batch with room whose block then ends soonest (the fullest
        such micro-batch), if that is before ``beat_ms``; ``fin`` (per-rank finish) is updated and
        (first rank, size, added ms) returned. ``leaving=(rank, ms)``: the sequence leaves that rank,
        which finishes ``ms`` sooner. None, and nothing changes, when no ride ends in time."""
        if not self.blocks:
            return None
        n = int(self.inst.lengths[i])
        cand = np.flatnonzero(self.mb_free >= n)
        if not cand.size:
            return None
        add = self.times[self.row, i] / self.pace
        end = np.maximum.reduceat(fin[self.ranks], self.start) + add
        if leaving is not None:
            r, saved = leaving
            for b in np.flatnonzero((self.first <= r) & (r < self.first + self.d)).tolist():
                others = np.delete(fin[self.first[b]:self.first[b] + self.d[b]], r - self.first[b])
                end[b] = max(float(others.max(initial=-np.inf)), float(fin[r]) - saved) + add[b]
        ends = end[self.mb_block[cand]]
        k = int(np.lexsort((cand, self.mb_free[cand], ends))[0])
        if ends[k] >= beat_ms * (1 - 1e-12):
            return None
        j = int(cand[k])
        b = int(self.mb_block[j])
        first, d = self.blocks[b]
        self.mb_free[j] -= n
        self.wide[(first, d)][int(self.mb_index[j])].append(i)
        fin[first:first + d] += add[b]
        return first, d, float(add[b])


class _Repair:
    """Single-rank level state for local search: per rank its micro-batches and load."""

    def __init__(self, inst: Instance, sched: Schedule, fin: np.ndarray, above: np.ndarray) -> None:
        self.inst, self.fin, self.above = inst, fin.copy(), above.copy()
        self.cap = inst.capacity[1]
        self.speed = inst.block_speed[1]
        n = inst.lengths.size
        self.t = inst.times[1]
        self.rank = np.full(n, -1, dtype=np.int64)     # rank of each single-rank sequence (-1: other level)
        self.bin_free = np.zeros(n, dtype=np.int64)    # free tokens of the micro-batch holding it
        self.bins: list[list[list]] = [[] for _ in range(inst.gpus)]
        for r in range(inst.gpus):
            for ids in sched.get((r, 1), []):
                free = self.cap - int(inst.lengths[ids].sum())
                self.bins[r].append([free, list(ids)])
                self.rank[ids] = r
                self.bin_free[ids] = free
        self.most_free = np.array([max((f for f, _ in bs), default=-1) for bs in self.bins], dtype=np.int64)
        # wider blocks' micro-batches as [free tokens, ids]: a lone short sequence may ride along in one
        self.wide: Schedule = {blk: [list(ids) for ids in bins if ids] for blk, bins in sched.items() if blk[1] > 1}
        self.rides = _WideBins(inst, self.wide)

    def _bin_of(self, r: int, i: int) -> int:
        return next(k for k, (_, ids) in enumerate(self.bins[r]) if i in ids)

    def _refresh(self, r: int) -> None:
        self.bins[r] = [b for b in self.bins[r] if b[1]]
        for free, ids in self.bins[r]:
            self.bin_free[ids] = free
        self.most_free[r] = max((f for f, _ in self.bins[r]), default=-1)
        load = sum(float(self.t[ids].sum()) for _, ids in self.bins[r]) + self.inst.beta * len(self.bins[r])
        self.fin[r] = self.above[r] + load / self.speed[r]

    def _insert(self, q: int, i: int) -> None:
        n = int(self.inst.lengths[i])
        fitting = [k for k, (free, _) in enumerate(self.bins[q]) if free >= n]
        if fitting:
            k = min(fitting, key=lambda k: (self.bins[q][k][0], k))
        else:
            self.bins[q].append([self.cap, []])
            k = len(self.bins[q]) - 1
        self.bins[q][k][0] -= n
        self.bins[q][k][1].append(i)
        self.rank[i] = q

    def _remove(self, r: int, i: int) -> int:
        k = self._bin_of(r, i)
        self.bins[r][k][1].remove(i)
        self.bins[r][k][0] += int(self.inst.lengths[i])
        return k

    def try_move(self, r: int, i: int) -> bool:
        beta, n, t = self.inst.beta, int(self.inst.lengths[i]), float(self.t[i])
        k = self._bin_of(r, i)
        alone = len(self.bins[r][k][1]) == 1
        new_r = self.fin[r] - (t + (beta if alone else 0.0)) / self.speed[r]
        cost = self.fin + (t + beta * (self.most_free < n)) / self.speed
        cost[r] = np.inf
        q = int(np.argmin(cost))
        if max(cost[q], new_r) >= self.fin[r] * (1 - 1e-12):
            return False
        self._remove(r, i)
        self._insert(q, i)
        self._refresh(r)
        self._refresh(q)
        return True

    def try_swap(self, r: int, a: int) -> bool:
        n_a, t_a = int(self.inst.lengths[a]), float(self.t[a])
        lengths = self.inst.lengths
        cand = (self.rank >= 0) & (self.rank != r) & (self.t < t_a) & (self.bin_free + lengths >= n_a)
        if not cand.any():
            return False
        b_ids = np.flatnonzero(cand)
        delta = t_a - self.t[b_ids]
        q_of = self.rank[b_ids]
        worst = np.maximum(self.fin[r] - delta / self.speed[r], self.fin[q_of] + delta / self.speed[q_of])
        j = int(np.argmin(worst))
        if worst[j] >= self.fin[r] * (1 - 1e-12):
            return False
        b, q = int(b_ids[j]), int(q_of[j])
        ka, kb = self._remove(r, a), self._remove(q, b)
        for rank, k, i in ((r, ka, b), (q, kb, a)):
            self.bins[rank][k][0] -= int(lengths[i])
            self.bins[rank][k][1].append(i)
            self.rank[i] = rank
        self._refresh(r)
        self._refresh(q)
        return True

    def try_ride(self, r: int, i: int) -> bool:
        """Move sequence ``i`` of rank ``r`` into a wider block's micro-batch with room: ``r`` saves its
        time (and a beta when it was alone), the block's ranks pay its time at that width (every rank
        of a nested block finishes later by exactly that, blocks running largest-first). This is
        what empties the third, nearly empty micro-batch of a rank when beta is large."""
        if not self.rides.blocks:
            return False
        alone = len(self.bins[r][self._bin_of(r, i)][1]) == 1
        saved = (float(self.t[i]) + (self.inst.beta if alone else 0.0)) / self.speed[r]
        joined = self.rides.ride(i, self.fin, float(self.fin[r]), leaving=(r, saved))
        if joined is None:
            return False
        first, d, add = joined
        self._remove(r, i)
        self.rank[i] = -1
        self.above[first:first + d] += add
        self._refresh(r)
        return True

    def run(self, max_steps: int) -> None:
        for _ in range(max_steps):
            r = int(np.argmax(self.fin))
            mine = [i for _, ids in self.bins[r] for i in ids]
            if not mine:
                return
            mine.sort(key=lambda i: (-self.t[i], i))
            if not any(self.try_move(r, i) for i in mine) and not any(self.try_swap(r, i) for i in mine) \
                    and not any(self.try_ride(r, i) for i in reversed(mine)):
                return

    def schedule(self, sched: Schedule) -> Schedule:
        out = {b: [list(ids) for ids in bins] for b, bins in self.wide.items()}
        for r in range(self.inst.gpus):
            if self.bins[r]:
                out[(r, 1)] = [list(ids) for _, ids in self.bins[r]]
        return out


def finish_times(inst: Instance, sched: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Per-rank finish, and finish before the single-rank level, of nested blocks run largest-first."""
    fin = np.zeros(inst.gpus)
    leaf = np.zeros(inst.gpus)
    for (first, d), bins in sorted(sched.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        t = inst.t(d, first)
        load = sum(float(t[ids].sum()) for ids in bins if ids) + inst.beta * sum(1 for ids in bins if ids)
        pace = float(inst.speed[first:first + d].min())
        fin[first:first + d] = fin[first:first + d].max() + load / pace
        if d == 1:
            leaf[first] = load / pace
    return fin, fin - leaf


def pipeline_finish(inst: Instance, sched: Schedule) -> np.ndarray:
    """Per-rank finish under PP: stage loads of the nested blocks (largest first) plus the fill and
    drain of ``pp - 1`` stage times of the rank's largest micro-batch (the simulator's rule)."""
    fin = np.zeros(inst.gpus)
    peak = np.zeros(inst.gpus)
    for (first, d), bins in sorted(sched.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        items = [float(inst.t(d, first)[ids].sum()) + inst.beta for ids in bins if ids]
        if not items:
            continue
        pace = float(inst.speed[first:first + d].min())
        fin[first:first + d] = fin[first:first + d].max() + sum(items) / pace
        peak[first:first + d] = np.maximum(peak[first:first + d], max(items) / pace)
    return fin + (inst.pp - 1) * peak


def _split_block(inst: Instance, block: tuple[int, int], ids: list[int], cap_ms: float) -> list[list[int]]:
    """One block's sequences as micro-batches of at most ``cap_ms`` (stage time with beta; a longer
    sequence alone), balanced (longest first into the least loaded micro-batch with room) and within
    the block's memory."""
    first, d = block
    t, lengths, capacity = inst.t(d, first), inst.lengths, inst.capacity[d]
    order = sorted(ids, key=lambda i: (-t[i], i))
    budget = cap_ms - inst.beta
    count = min(len(order), max(1, math.ceil(float(t[order].sum()) / max(budget, 1e-12))))
    bins: list[list[int]] = [[] for _ in range(count)]
    free = [capacity] * count
    heap = [(0.0, k) for k in range(count)]  # (load, micro-batch), least loaded first
    for i in order:
        n = int(lengths[i])
        full = []
        # the least loaded micro-batch with room for the tokens, unless the time would pass the cap
        while heap and free[heap[0][1]] < n:
            full.append(heapq.heappop(heap))
        if heap and heap[0][0] and heap[0][0] + t[i] > budget:
            full.extend(heap)
            heap = []
        if heap:
            load, k = heapq.heappop(heap)
        else:
            load, k = 0.0, len(bins)
            bins.append([])
            free.append(capacity)
        bins[k].append(i)
        free[k] -= n
        heapq.heappush(heap, (load + float(t[i]), k))
        for entry in full:
            heapq.heappush(heap, entry)
    return [b for b in bins if b]


_REPACK_STEPS = 16  # caps tried, each 1/sqrt(2) of the one before


def pipeline_repack(inst: Instance, sched: Schedule) -> tuple[Schedule, float]:
    """The best re-split of every block's micro-batches under a common cap on a micro-batch's stage
    time (the schedule as given included), by pipelined makespan; returns it and that makespan.

    Sequences stay on their blocks, so loads move only by the betas of the micro-batches added or
    removed; a lower cap trades those betas against a smaller fill and drain on every rank. A
    block's cap never goes below the largest sequence that every one of its ranks holds anyway
    (splitting further shrinks no rank's fill and drain).
    """
    best = (sched, float(pipeline_finish(inst, sched).max(initial=0.0)))
    if inst.pp == 1 or not sched:
        return best
    blocks = {(first, d): [i for ids in bins for i in ids] for (first, d), bins in sched.items() if any(bins)}
    largest = np.zeros(inst.gpus)  # stage time of each rank's largest sequence alone
    for (first, d), ids in blocks.items():
        item = (float(inst.t(d, first)[ids].max()) + inst.beta) / float(inst.speed[first:first + d].min())
        largest[first:first + d] = np.maximum(largest[first:first + d], item)
    floor = {(first, d): float(largest[first:first + d].min()) * float(inst.speed[first:first + d].min())
             for first, d in blocks}
    cap = max(float(inst.t(d, first)[ids].sum()) + inst.beta for (first, d), bins in sched.items() for ids in bins
              if ids)
    for _ in range(_REPACK_STEPS):
        candidate = {blk: _split_block(inst, blk, ids, max(cap, floor[blk])) for blk, ids in blocks.items()}
        ms = float(pipeline_finish(inst, candidate).max(initial=0.0))
        if ms < best[1] * (1 - 1e-12):
            best = (candidate, ms)
        if cap <= min(floor.values()):
            break  # every block is at its floor: a lower cap changes nothing
        cap /= math.sqrt(2)
    return best


def repair(inst: Instance, sched: Schedule, fin: np.ndarray, above: np.ndarray,
           max_steps: int | None = None) -> tuple[Schedule, float]:
    if 1 not in inst.sizes or inst.lengths.size == 0:
        return sched, float(fin.max(initial=0.0))
    state = _Repair(inst, sched, fin, above)
    state.run(max_steps if max_steps is not None else min(2 * inst.lengths.size + 10, _REPAIR_STEPS))
    return state.schedule(sched), float(state.fin.max())


_MAX_COUNT = 4  # single-rank micro-batches per rank a refill considers (each costs a beta)


def _counts(inst: Instance, room: np.ndarray, ms_per_token: float) -> np.ndarray:
    """Per rank, the number of single-rank micro-batches that lets it take the most tokens within
    ``room`` (nominal ms): each one holds ``capacity[1]`` tokens and costs a beta, so a rank with
    little room left takes one (or none), an idle rank as many as memory or time allow."""
    cap, beta = inst.capacity[1], inst.beta
    best_c = np.zeros(room.size, dtype=np.int64)
    best_tok = np.zeros(room.size)
    for c in range(1, _MAX_COUNT + 1):
        tok = np.minimum(c * cap, (room - c * beta) / ms_per_token)
        better = tok > best_tok * (1 + 1e-9) + 1e-9
        best_c = np.where(better, c, best_c)
        best_tok = np.where(better, tok, best_tok)
    return best_c


def refill(inst: Instance, sched: Schedule, target_ms: float) -> Schedule:
    """Re-deal the single-rank level of ``sched`` to the micro-batch counts a step of ``target_ms`` needs.

    LPT placement (``place``) opens a micro-batch whenever a sequence finishes earliest there, so
    when beta is large it leaves many ranks with a third, nearly empty micro-batch: on real
    Wikipedia lengths at 1024 ranks (FlexSP's GPT-7B model, beta 629 ms) the plan paid 2.17 betas
    per rank, and 230 ranks ran three micro-batches, half empty; refilled, 1.88 and none (1.200x ->
    1.135x of issue 4's bound on batch 0). Here the wider blocks stay (the short sequences that
    rode along in them come back down: the certified bound's LP never puts them there), each
    rank gets the number of micro-batches that holds the most tokens in the time it has left
    before ``target_ms`` (``_counts``), and sequences go longest-first to the rank with the most
    time left that has a micro-batch with room (best fit within it). What does not fit rides along
    in a wider micro-batch with room or goes where it finishes earliest, opening a micro-batch if
    it must, whichever ends sooner; the caller repairs and compares the result.
    """
    return deal(inst, *split_level(inst, sched, target_ms), target_ms)


def split_level(inst: Instance, sched: Schedule, target_ms: float) -> tuple[Schedule, list[int]]:
    """The wider blocks of ``sched`` without their short riders, and the sequences of the
    single-rank level with those riders (what ``refill`` deals again)."""
    beta, t1, speed = inst.beta, inst.times[1], inst.block_speed[1]
    wide: Schedule = {}
    single: list[int] = []
    for (first, d), bins in sched.items():
        if d == 1:
            single.extend(i for ids in bins for i in ids)
            continue
        kept = []
        for ids in bins:
            # a rider: holds on one rank and runs there within the target (so no degree target widened it)
            riders = [i for i in ids if inst.dmin[i] == 1 and t1[i] + beta <= target_ms * speed.max()]
            single.extend(riders)
            rest = [i for i in ids if i not in set(riders)]
            if rest:
                kept.append(rest)
        if kept:
            wide[(first, d)] = kept
    return wide, single


def deal(inst: Instance, wide: Schedule, single: list[int], target_ms: float) -> Schedule:
    """``refill``'s dealing of the single-rank sequences ``single`` around the wider blocks ``wide``
    (copied: riders join copies of its micro-batches, so one ``wide`` serves several deals)."""
    wide = {blk: [list(ids) for ids in mbs] for blk, mbs in wide.items()}
    beta, lengths, t1, speed = inst.beta, inst.lengths, inst.times[1], inst.block_speed[1]
    cap = inst.capacity[1]
    if not single:
        return wide
    above = finish_times(inst, wide)[0]
    room = np.maximum((target_ms - above) * speed, 0.0)
    ids_arr = np.asarray(single, dtype=np.int64)
    ms_per_token = max(float(t1[ids_arr].sum()) / float(lengths[ids_arr].sum()), 1e-12)
    count = _counts(inst, room, ms_per_token)
    # A rank of a wide block with little time left gets more tokens done riding along in that
    # block (no beta, the block's memory and its ranks' time shared) than in a micro-batch of its
    # own: on a 16-rank group of a long sequence (FlexSP's GPT-7B model), 0.74 s left buys ~600
    # tokens per rank alone, ~1.9K riding.
    # Such ranks take no micro-batch of their own; the overflow rides along with them.
    tokens = np.minimum(count * cap, np.maximum(room - count * beta, 0.0) / ms_per_token)
    riding = np.zeros(inst.gpus)
    for (first, d), mbs in wide.items():
        rate = max(float(inst.t(d, first)[ids_arr].sum()) / float(lengths[ids_arr].sum()), 1e-12)  # ms/token/rank
        free = sum(inst.capacity[d] - int(lengths[ids].sum()) for ids in mbs)
        share = min(free, float(room[first:first + d].min()) / rate) / d
        riding[first:first + d] = np.maximum(riding[first:first + d], share)
    count = np.where(riding > tokens, 0, count)
    budget = room - count * beta  # ms of sequence time each rank may still take
    bins: list[list[list]] = [[[cap, []] for _ in range(int(count[r]))] for r in range(inst.gpus)]
    ready = [(-float(budget[r]), r) for r in range(inst.gpus) if count[r]]
    heapq.heapify(ready)
    parked: list[tuple[int, int]] = []  # (-most free tokens, rank): no micro-batch holds the current length
    overflow: list[int] = []
    for i in sorted(single, key=lambda i: (-t1[i], i)):  # time rises with length: lengths fall too
        n, ti = int(lengths[i]), float(t1[i])
        while parked and -parked[0][0] >= n:
            r = heapq.heappop(parked)[1]
            heapq.heappush(ready, (-float(budget[r]), r))
        while ready and -ready[0][0] >= ti:
            r = ready[0][1]
            fitting = [k for k, (free, _) in enumerate(bins[r]) if free >= n]
            if not fitting:
                heapq.heappop(ready)
                heapq.heappush(parked, (-max(free for free, _ in bins[r]), r))
                continue
            k = min(fitting, key=lambda k: (bins[r][k][0], k))
            bins[r][k][0] -= n
            bins[r][k][1].append(i)
            budget[r] -= ti
            heapq.heapreplace(ready, (-float(budget[r]), r))
            break
        else:
            overflow.append(i)
    out = dict(wide)
    fin = above.copy()
    most_free = np.full(inst.gpus, -1, dtype=np.int64)
    for r in range(inst.gpus):
        used = [b for b in bins[r] if b[1]]
        if used:
            out[(r, 1)] = [ids for _, ids in used]
            fin[r] += (sum(float(t1[ids].sum()) for _, ids in used) + beta * len(used)) / speed[r]
            most_free[r] = max(free for free, _ in used)
        bins[r] = used
    # what overflows rides along in a wider micro-batch with room when that ends sooner (cheap on
    # 2-8 rank groups inside a node, and the only use of the idle end of a long sequence's group)
    rides = _WideBins(inst, wide)
    for i in overflow:
        n, ti = int(lengths[i]), float(t1[i])
        single_fin = fin + (ti + beta * (most_free < n)) / speed
        r = int(np.argmin(single_fin))
        if rides.ride(i, fin, float(single_fin[r])) is not None:
            continue
        fitting = [k for k, (free, _) in enumerate(bins[r]) if free >= n]
        if fitting:
            k = min(fitting, key=lambda k: (bins[r][k][0], k))
        else:
            bins[r].append([cap, []])
            out.setdefault((r, 1), []).append(bins[r][-1][1])
            k = len(bins[r]) - 1
            fin[r] += beta / speed[r]
        bins[r][k][0] -= n
        bins[r][k][1].append(i)
        fin[r] += ti / speed[r]
        most_free[r] = max(free for free, _ in bins[r])
    return out


def balanced_target(inst: Instance, lower_bound_ms: float) -> float:
    """The smallest step time ``T`` whose degrees (``degrees_for(T)``) leave work that fits ``T``.

    Spreading a sequence wider shortens it but adds communication; ``T`` balances the two: below
    it the extra communication of the forced degrees overflows the ranks, above it sequences run
    narrower than they need to. Found by bisection (work only falls as ``T`` grows).
    """
    beta, total_speed = inst.beta, float(inst.speed.sum())

    def work_per_rank(target: float) -> float:
        deg = degrees_for(inst, target)
        area = sum(float(inst.times[d][deg == d].sum()) * d for d in inst.sizes)
        slots = max(float(inst.gpus), float(deg[deg > 1].sum()) + float(inst.gpus))
        return (area + beta * slots) / total_speed

    deg_inf = degrees_for(inst, np.inf)
    longest = (max(float(inst.times[d][deg_inf == d].max(initial=0.0)) for d in inst.sizes) + beta) * inst.pp
    lo, hi = lower_bound_ms, max(lower_bound_ms, work_per_rank(np.inf), longest)
    for _ in range(30):
        if hi - lo <= 1e-4 * hi:
            break
        mid = 0.5 * (lo + hi)
        if work_per_rank(mid) <= mid:
            hi = mid
        else:
            lo = mid
    return hi


_TARGETS = (1.0, 0.95, 1.05)
_WIDE_TARGETS = (1.0, 0.95, 1.05, 0.9, 1.1, 0.8, 1.25, 0.7, 1.5, 0.6, 2.0, 0.5, 3.0, 0.4, np.inf)
_WIDE_BELOW = 2048  # sequences x ranks under which every wide target is tried (cheap there)
_RIDE_BELOW = 2     # sequences per rank up to which riding along is tried (measured: never wins above)


def heuristic(inst: Instance, lower_bound_ms: float, repair_top: int = 1,
              refill_level: bool = True) -> tuple[Schedule, float]:
    """Best schedule over a few degree targets; returns it and its step time (without grad reduce).

    With ``refill_level`` (without pipeline stages) the best one's single-rank level is also
    re-dealt (``refill``) and repaired, and kept only when faster: never worse than without it.
    """
    if inst.lengths.size == 0:
        return {}, 0.0
    target = balanced_target(inst, lower_bound_ms)
    seen: set[bytes] = set()
    placed: list[tuple[float, int, Schedule, np.ndarray, np.ndarray]] = []
    targets = _WIDE_TARGETS if inst.lengths.size * inst.gpus <= _WIDE_BELOW else _TARGETS
    for k, f in enumerate(targets):
        deg = degrees_for(inst, target * f)
        key = deg.tobytes()
        if key in seen:
            continue
        seen.add(key)
        for ride in (False, True) if inst.lengths.size <= _RIDE_BELOW * inst.gpus else (False,):
            sched, fin, above = place(inst, deg, target * f, ride)
            placed.append((float(fin.max()), 2 * k + ride, sched, fin, above))
    if inst.pp > 1:
        # One wide group running many small micro-batches keeps every pipeline full, a layout no
        # degree target above leads to: so every uniform degree is a candidate too.
        for j, d in enumerate(inst.sizes):
            deg = np.maximum(inst.dmin, d)
            if deg.tobytes() not in seen:
                seen.add(deg.tobytes())
                sched, fin, above = place(inst, deg)
                placed.append((float(fin.max()), 2 * (len(targets) + j), sched, fin, above))
    placed.sort(key=lambda p: (p[0], p[1]))
    if inst.pp > 1:
        return _pipelined_best(inst, placed, repair_top)
    repaired = [repair(inst, sched, fin, above) for _, _, sched, fin, above in placed[:repair_top]]
    best = min(repaired, key=lambda r: r[1])
    if refill_level and 1 in inst.sizes and best[1] > 0:
        best = _refilled(inst, best)
    return best


_DEAL_BOTH_BELOW = 1 << 20  # sequences x ranks under which the unconsolidated wide level is dealt too


def _refilled(inst: Instance, best: tuple[Schedule, float]) -> tuple[Schedule, float]:
    """``best`` with its wide level consolidated (``consolidate``, where that promises a shorter
    step) and its single-rank level dealt again around it (``refill``); kept only when faster.

    The fluid count behind the promise ignores how sequences pack: with few sequences per rank
    (FlexSP's model on 64 ranks: 17K-token micro-batches, 8 sequences per rank) a consolidated
    wide level it rated 0.2% faster dealt 4% slower. So below ``_DEAL_BOTH_BELOW`` (where a deal
    costs hundredths of a second) the wide level as placed is dealt too and the faster wins; at
    1024 ranks x 8192 a deal costs ~0.3 s of the 2 s budget and the count decides alone.
    """
    wide, single = split_level(inst, best[0], best[1])
    merged = consolidate(inst, wide, finish_times(inst, wide)[0], best[1], np.asarray(single, dtype=np.int64),
                         _MAX_COUNT)
    both = merged is not wide and inst.lengths.size * inst.gpus < _DEAL_BOTH_BELOW
    for level in (wide, merged) if both else (merged,):
        again = repair(inst, *_best_refill(inst, level, single, best[1]))
        if again[1] < best[1] * (1 - 1e-12):
            best = again
    return best


_REFILL_TARGETS = (1.0, 1.003, 1.006, 1.01)  # x the mean finish of a refill at the heuristic's makespan


def _best_refill(inst: Instance, wide: Schedule, single: list[int],
                 ms: float) -> tuple[Schedule, np.ndarray, np.ndarray]:
    """The fastest of a few deals (``deal``) of the single-rank sequences ``single`` around the
    wider blocks ``wide`` of a schedule of makespan ``ms``, with its per-rank finish and finish
    before size 1.

    The target decides the micro-batch counts and what overflows (and rides along or opens a
    micro-batch): a refill at the heuristic's own makespan leaves memory-bound ranks early and
    piles the rest on a few; just above its mean finish (what the ranks would reach if balanced)
    the overflow lands where it costs least, and the repair after it has almost nothing to do
    (measured on real Wikipedia lengths at 1024 ranks: 0.01 s of repair instead of 0.5 s).
    """
    loose = deal(inst, wide, single, ms)
    fin, above = finish_times(inst, loose)
    best = (float(fin.max()), loose, fin, above)
    mean = float(fin.mean())
    for f in _REFILL_TARGETS:
        out = deal(inst, wide, single, mean * f)
        fin, above = finish_times(inst, out)
        if float(fin.max()) < best[0] * (1 - 1e-12):
            best = (float(fin.max()), out, fin, above)
    return best[1], best[2], best[3]


def _pipelined_best(inst: Instance, placed: list, repair_top: int) -> tuple[Schedule, float]:
    """Under PP: candidates ranked by their re-split pipelined makespan; the best ``repair_top`` are
    also repaired (the repair balances loads) and re-split again, and the fastest of all wins."""
    scored = sorted(((*pipeline_repack(inst, sched), k, sched, fin, above) for _, k, sched, fin, above in placed),
                    key=lambda c: (c[1], c[2]))
    out = [(c[0], c[1]) for c in scored[:repair_top]]
    for _, _, _, sched, fin, above in scored[:repair_top]:
        out.append(pipeline_repack(inst, repair(inst, sched, fin, above)[0]))
    return min(out, key=lambda r: r[1])
