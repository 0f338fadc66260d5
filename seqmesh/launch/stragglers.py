"""Per-rank step-time breakdown and per-rank speed factors, from ``metrics.jsonl``.

The step loop logs, per step, each rank's disjoint timed spans in ``rank_timings`` (lists in rank
order: ``compute_s`` (forward/backward, sequence-parallel communication included), ``reduce_s``,
``optimizer_s``, ``plan_wait_s``, and any further span it learns to time) and the cost model's
prediction of each rank's own work at nominal speed in ``rank_predicted_ms``.

*Idle* is not timed: the gradient reduction is a collective, so a rank that finishes its micro-
batches early waits inside it for the slowest one. The breakdown therefore splits each rank's
``reduce_s`` into the wait (``idle``: the slowest rank's arrival minus this rank's) and the
reduction proper (the rest).

*Speed factors* are what the scheduler's cost model takes (``CostModel.speed``: 1.0 = nominal, a
group runs at its slowest member's pace): per rank, predicted over measured compute time, summed
over the steps, divided by the median rank's figure. Dividing by the median keeps only the
*relative* slowness (the cost model's absolute scale is the profiler's business, and the median is
not moved by the straggler itself). Members of one sequence-parallel group wait for each other, so
they all measure the group's pace: a straggler also lowers its group mates' factors, which is what
the cost model's slowest-member rule needs for that group, and the plan built from the factors
moves work away from the whole group until the ranks are regrouped.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from seqmesh.scheduler.cost_model import CostModel

# Spans that happen after the gradient reduction starts; all others delay a rank's arrival at it.
_AFTER_REDUCE = ("reduce_s", "optimizer_s")


def _measured(records: Iterable[Mapping[str, Any]], skip_warmup: bool) -> list[Mapping[str, Any]]:
    records = [r for r in records if r.get("rank_timings")]
    kept = [r for r in records if not (skip_warmup and r.get("warmup"))]
    return kept or records


def step_breakdown(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """One step's per-rank seconds by component: the timed spans, with ``reduce`` split into
    ``grad_reduce`` and ``idle`` (module docstring). Empty when the record has no per-rank timings."""
    timings: Mapping[str, Sequence[float]] = record.get("rank_timings") or {}
    if not timings:
        return {}
    world = len(next(iter(timings.values())))
    before = [k for k in timings if k not in _AFTER_REDUCE]
    arrival = [sum(timings[k][r] for k in before) for r in range(world)]
    last = max(arrival)
    out = {k.removesuffix("_s"): [float(v) for v in timings[k]] for k in before}
    reduce = timings.get("reduce_s", [0.0] * world)
    idle = [min(last - arrival[r], reduce[r]) for r in range(world)]
    out["grad_reduce"] = [float(reduce[r] - idle[r]) for r in range(world)]
    if "optimizer_s" in timings:
        out["optimizer"] = [float(v) for v in timings["optimizer_s"]]
    out["idle"] = idle
    return out


def mean_breakdown(records: Iterable[Mapping[str, Any]], skip_warmup: bool = True) -> dict[str, list[float]]:
    """Per-rank mean seconds per step of each component over the (post-warmup) steps."""
    steps = [step_breakdown(r) for r in _measured(records, skip_warmup)]
    if not steps:
        return {}
    return {key: [statistics.fmean(s[key][r] for s in steps) for r in range(len(values))]
            for key, values in steps[0].items()}


def speed_factors(records: Iterable[Mapping[str, Any]], skip_warmup: bool = True) -> list[float]:
    """Per-rank speed factors for ``CostModel.speed`` (module docstring); a rank that had no work
    gets 1.0. Raises ValueError when the records lack the per-rank figures needed."""
    steps = [r for r in _measured(records, skip_warmup) if r.get("rank_predicted_ms")]
    if not steps:
        raise ValueError("speed factors need per-rank timings and predictions (rank_timings and rank_predicted_ms "
                         "in metrics.jsonl); this run's metrics have none. Train with a seqmesh that logs them")
    world = len(steps[0]["rank_predicted_ms"])
    predicted = [sum(s["rank_predicted_ms"][r] for s in steps) for r in range(world)]
    measured = [1e3 * sum(s["rank_timings"]["compute_s"][r] for s in steps) for r in range(world)]
    rates = [p / m if p > 0 and m > 0 else math.nan for p, m in zip(predicted, measured)]
    known = [x for x in rates if not math.isnan(x)]
    if not known:
        raise ValueError("no rank had any planned work in the measured steps; speed factors are undefined")
    median = statistics.median(known)
    return [1.0 if math.isnan(x) else x / median for x in rates]


def stragglers(factors: Sequence[float], threshold: float = 0.9) -> list[int]:
    """Ranks slower than ``threshold`` times the median rank."""
    return [r for r, f in enumerate(factors) if f < threshold]


def with_measured_speed(cost_model: CostModel, records: Iterable[Mapping[str, Any]]) -> CostModel:
    """``cost_model`` with the run's measured per-rank speed factors, for the scheduler's next run."""
    factors = speed_factors(records)
    if cost_model.speed and len(cost_model.speed) != len(factors):
        raise ValueError(f"the cost model has {len(cost_model.speed)} speed factors, the run {len(factors)} ranks; "
                         f"use a cost model for this number of HDP ranks")
    return cost_model.with_speed([round(f, 4) for f in factors])
