"""One planning problem, precomputed once and shared by the heuristic and the MILP.

Both planners place every sequence in a *block*: an aligned range of ``d`` ranks
``[k*d, (k+1)*d)`` for an allowed size ``d``. A block runs its sequences as one or more
micro-batches (memory bounds each), all of its ranks together. With power-of-two sizes the blocks
nest (a buddy tree), and running the blocks largest-first means that every rank of a block is
free at the same moment, so no rank ever waits for another: a rank's finish time is just the sum
of the loads of the blocks that contain it. That is what makes the problem small enough to solve
exactly, and it keeps ByteScale's freedom (ranks run different numbers of micro-batches, a
micro-batch need not use every rank) and FlexSP's form (all blocks of one level) as special cases.
With arbitrary sizes the blocks may overlap without nesting; the simulator then charges the waits.
Under a cluster file (``CostModel.links``) blocks of one size differ by the links they span, so a
sequence's time depends on the block (``block_times``, ``t``): blocks with one link pattern share
one row of times, and ``times`` keeps each sequence's best block (what degree choices and bounds use).
With several SP modes to choose from (``attention.choose``) a sequence's time is its fastest mode's;
the simulator prices a group at the one mode fastest for all its sequences together (never less),
and the planners keep whichever answer it finds fastest.
Under PP (``cost_model.pp > 1``) times are stage times and every rank also pays the pipeline's fill
and drain, ``pp - 1`` times its largest micro-batch (``pipeline_finish``); nested blocks keep each
rank's micro-batches at consecutive positions, as the pipelined trainer needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.plan import Plan, plan_from_assignment
from seqmesh.scheduler.simulate import plannable_sizes, smallest_holding_size

# A schedule: block (first rank, size) -> micro-batches (lists of sequence ids), run in order.
Schedule = dict[tuple[int, int], list[list[int]]]


@dataclass
class Instance:
    lengths: np.ndarray          # int64 [n]
    gpus: int
    cost_model: CostModel
    sizes: tuple[int, ...]       # allowed group sizes, ascending
    speed: np.ndarray            # per-rank speed factors [gpus]
    dmin: np.ndarray             # smallest allowed size holding each sequence alone [n]
    times: dict[int, np.ndarray]  # size -> per-sequence ms at that size's best block, speed 1, without beta
    capacity: dict[int, int]     # size -> tokens a group of that size holds per micro-batch
    block_speed: dict[int, np.ndarray]  # size -> pace of each aligned block (its slowest rank)
    profile: dict[int, np.ndarray]      # size -> row of ``profile_times`` each aligned block uses
    profile_times: dict[int, np.ndarray]  # size -> [link patterns, sequences] ms, speed 1, without beta

    def t(self, d: int, first: int) -> np.ndarray:
        """Per-sequence ms on the block of size ``d`` starting at rank ``first``."""
        return self.profile_times[d][self.profile[d][first // d]]

    def block_times(self, d: int, i: int) -> np.ndarray:
        """Sequence ``i``'s ms on every aligned block of size ``d``."""
        return self.profile_times[d][self.profile[d], i]

    @property
    def beta(self) -> float:
        """Fixed cost of a micro-batch on one device (one stage's share under PP)."""
        return self.cost_model.microbatch_ms

    @property
    def pp(self) -> int:
        return self.cost_model.pp

    @classmethod
    def build(cls, lengths: Sequence[int], gpus: int, cost_model: CostModel,
              group_sizes: Sequence[int] | None = None) -> "Instance":
        arr = np.asarray([int(n) for n in lengths], dtype=np.int64)
        if arr.size and arr.min() < 1:
            raise ValueError(f"sequence lengths must be >= 1 token, got {int(arr.min())}")
        sizes = plannable_sizes(gpus, cost_model, group_sizes)
        speed = cost_model.rank_speed(gpus)
        capacity = {d: cost_model.capacity(d) for d in sizes}
        dmin = np.zeros(arr.size, dtype=np.int64)
        for d in reversed(sizes):
            dmin[arr <= capacity[d]] = d
        if arr.size and (dmin == 0).any():
            smallest_holding_size(int(arr[dmin == 0].max()), cost_model, sizes)
        profile: dict[int, np.ndarray] = {}
        profile_times: dict[int, np.ndarray] = {}
        for d in sizes:
            rows: dict[object, int] = {}
            firsts: list[int] = []
            index = np.zeros(gpus // d, dtype=np.int64)
            for b in range(gpus // d):
                block = cost_model.block(b * d, d) if d > 1 else None
                key = None if block is None else block.key
                if key not in rows:
                    rows[key] = len(firsts)
                    firsts.append(b * d)
                index[b] = rows[key]
            profile[d] = index
            profile_times[d] = np.stack([np.asarray(cost_model.seq_ms(arr, d, first if cost_model.links else None),
                                                    dtype=np.float64) for first in firsts])
        times = {d: profile_times[d].min(axis=0) for d in sizes}
        block_speed = {d: speed[: (gpus // d) * d].reshape(gpus // d, d).min(axis=1) for d in sizes}
        return cls(arr, gpus, cost_model, sizes, speed, dmin, times, capacity, block_speed, profile, profile_times)

    def to_plan(self, schedule: Schedule) -> Plan:
        """Order blocks largest-first and number micro-batches so every rank keeps that order.

        A group's micro-batch index is one more than the latest index any of its ranks has used,
        so groups sharing a rank never share an index, and each rank meets its groups in exactly
        the order the planners priced.

        Within a block the micro-batches run shortest first (without PP): every rank's finish is
        the same in any order, but the gradient reduction overlaps only the rank's *last* backward
        (``parallel.overlap_grad_reduce``), and a bucket's collective waits for the rank that
        launches it last, so a short last micro-batch on a late rank would leave the reduction
        exposed (``simulate.overlapped_step_ms``; bench/comm_sim.py measured it).
        """
        last = np.full(self.gpus, -1, dtype=np.int64)
        slots: list[list[tuple[int, int, list[int]]]] = []
        for (first, d) in sorted(schedule, key=lambda b: (-b[1], b[0])):
            bins = [ids for ids in schedule[(first, d)] if ids]
            if self.pp == 1:
                t = self.t(d, first)
                bins = sorted(bins, key=lambda ids: (float(t[ids].sum()), sorted(int(i) for i in ids)))
            for ids in bins:
                j = int(last[first:first + d].max()) + 1
                last[first:first + d] = j
                while len(slots) <= j:
                    slots.append([])
                slots[j].append((first, d, sorted(int(i) for i in ids)))
        return plan_from_assignment(self.gpus, [sorted(mb) for mb in slots])
