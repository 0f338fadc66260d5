"""Static sequence parallelism: the baseline every adaptive plan must beat.

The HDP ranks are cut once into ``gpus / sp`` groups of ``sp`` ranks (sp=1 is plain data
parallelism) and every micro-batch uses all of them. The number of micro-batches is the fewest
that best-fit-decreasing packing needs (memory is the bin); sequences then go longest-first to the
group that would finish earliest among those with room left, into the fullest of its micro-batches
that still holds them (best fit). So the baseline is balanced and memory-tight, not a strawman;
it only lacks the freedom to change group sizes.

Under PP (``cost_model.pp > 1``) the fewest micro-batches are not the fastest: every rank pays
its pipeline's fill and drain, ``pp - 1`` stage times of its largest micro-batch. So the static
plan also tries 1, 2, 4... times as many micro-batches, each group's sequences dealt longest-first
to its least loaded micro-batch with room (balanced rather than full), and keeps the fastest.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seqmesh.scheduler.cost_model import CapacityError, CostModel
from seqmesh.scheduler.packing import best_fit_decreasing
from seqmesh.scheduler.plan import Plan, plan_from_assignment
from seqmesh.scheduler.simulate import lower_bound, plannable_sizes, simulate


def _deal(lengths: list[int], times: np.ndarray, group_speed: np.ndarray, rounds: int,
          capacity: int, balance: bool = False) -> list[list[list[int]]] | None:
    """Place sequences on ``rounds`` micro-batches of each group; None when they do not fit.

    Within a group a sequence goes to the fullest micro-batch with room (best fit), or with
    ``balance`` to the least loaded one with room.
    """
    n_groups = len(group_speed)
    load = np.zeros(n_groups)
    round_load = np.zeros((n_groups, rounds))
    free = [[capacity] * rounds for _ in range(n_groups)]
    most_free = np.full(n_groups, capacity)
    bins: list[list[list[int]]] = [[[] for _ in range(rounds)] for _ in range(n_groups)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        finish = np.where(most_free >= n, (load + times[:, i]) / group_speed, np.inf)
        g = int(np.argmin(finish))
        if not np.isfinite(finish[g]):
            return None
        fitting = (r for r in range(rounds) if free[g][r] >= n)
        j = min(fitting, key=(lambda r: (round_load[g][r], r)) if balance else (lambda r: (free[g][r], r)))
        free[g][j] -= n
        most_free[g] = max(free[g])
        load[g] += times[g, i]
        round_load[g][j] += times[g, i]
        bins[g][j].append(i)
    return bins


def group_times(lengths: list[int], gpus: int, sp: int, cost_model: CostModel) -> np.ndarray:
    """[group, sequence] ms: every group prices by its own links under a cluster file (a row per
    link pattern, shared), else one row for all."""
    arr = np.asarray(lengths, dtype=np.float64)
    n_groups = gpus // sp
    if cost_model.links is None or sp == 1:
        return np.broadcast_to(np.asarray(cost_model.seq_ms(arr, sp), dtype=np.float64), (n_groups, arr.size))
    rows: dict[tuple, np.ndarray] = {}
    out = np.empty((n_groups, arr.size))
    for g in range(n_groups):
        block = cost_model.block(g * sp, sp)
        if block.key not in rows:
            rows[block.key] = np.asarray(cost_model.seq_ms(arr, sp, g * sp), dtype=np.float64)
        out[g] = rows[block.key]
    return out


def static_plan(lengths: Sequence[int], gpus: int, sp: int, cost_model: CostModel) -> Plan:
    if sp < 1 or gpus % sp:
        raise ValueError(f"static sp={sp} must be a positive divisor of the {gpus} HDP ranks")
    lengths = [int(n) for n in lengths]
    capacity = cost_model.capacity(sp)
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise CapacityError(f"a sequence of {max(too_long)} tokens does not fit a static SP group of {sp} ranks "
                         f"(memory holds {capacity} tokens per micro-batch); raise scheduler.sp, use the adaptive "
                         "scheduler, or truncate such sequences")
    n_groups = gpus // sp
    group_speed = cost_model.rank_speed(gpus).reshape(n_groups, sp).min(axis=1)
    times = group_times(lengths, gpus, sp, cost_model)
    rounds = max(1, -(-len(best_fit_decreasing(range(len(lengths)), lengths, capacity)) // n_groups))
    while (bins := _deal(lengths, times, group_speed, rounds, capacity)) is None:
        rounds += 1
    best = _priced(bins, gpus, sp, lengths, cost_model)
    if cost_model.pp > 1:
        most = max(rounds, -(-len(lengths) // n_groups))
        count = rounds
        while True:
            balanced = _deal(lengths, times, group_speed, count, capacity, balance=True)
            if balanced is not None:
                best = min(best, _priced(balanced, gpus, sp, lengths, cost_model), key=lambda p: p[0])
            if count >= most:
                break
            count = min(2 * count, most)
    ms, mbs = best
    return plan_from_assignment(gpus, mbs, ms, lower_bound(lengths, gpus, cost_model))


def _priced(bins: list[list[list[int]]], gpus: int, sp: int, lengths: list[int],
            cost_model: CostModel) -> tuple[float, list]:
    """(simulated ms, micro-batches) of a dealing: micro-batch j holds every group's j-th one."""
    mbs = [[(g * sp, sp, bins[g][j]) for g in range(len(bins)) if bins[g][j]] for j in range(len(bins[0]))]
    mbs = [mb for mb in mbs if mb]
    return simulate(plan_from_assignment(gpus, mbs), lengths, cost_model), mbs


def best_static(lengths: Sequence[int], gpus: int, cost_model: CostModel) -> Plan:
    """The fastest static plan over every power-of-two SP degree that holds the batch's longest sequence."""
    plans = []
    for sp in plannable_sizes(gpus, cost_model):
        if gpus % sp == 0 and max(lengths) <= cost_model.capacity(sp):
            plan = static_plan(lengths, gpus, sp, cost_model)
            plan.meta["baseline"] = f"static-sp={sp}"
            plans.append(plan)
    if not plans:
        raise ValueError(f"no static SP degree up to {gpus} holds the longest sequence ({max(lengths)} tokens)")
    return min(plans, key=lambda p: p.predicted_ms)


def baseline_plan(spec: str, lengths: Sequence[int], gpus: int, cost_model: CostModel) -> Plan:
    if spec == "best-static":
        return best_static(lengths, gpus, cost_model)
    if spec.startswith("static-sp="):
        try:
            sp = int(spec.split("=", 1)[1])
        except ValueError:
            raise ValueError(f"--baseline {spec!r}: K in static-sp=K must be an integer") from None
        plan = static_plan(lengths, gpus, sp, cost_model)
        plan.meta["baseline"] = spec
        return plan
    raise ValueError(f"--baseline {spec!r}: use static-sp=K (K divides --gpus) or best-static")
