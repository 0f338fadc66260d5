"""The adaptive planner: the heuristic answers first, the MILP tries to beat it, the better wins.

The heuristic (seqmesh.scheduler.greedy) takes milliseconds and stays within a few percent of the
bound when many sequences share the ranks; where few do (a handful of sequences per step), the
discrete choices matter and the exact MILP (seqmesh.scheduler.milp), warm-started from the
heuristic, finds the optimum in well under a second. The winner is chosen by the one simulator,
so a MILP answer that looks better only under its bucketed approximation is never taken. Under
PP the MILP's answer is also re-split into micro-batches for the pipeline (the bucketed model does
not see the fill and drain), and the simulator picks among the answers as given and as re-split.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.greedy import finish_times, heuristic, pipeline_repack, repair
from seqmesh.scheduler.instance import Instance
from seqmesh.scheduler.milp import exact_fits, solve_milp
from seqmesh.scheduler.plan import Plan, plan_from_assignment
from seqmesh.scheduler.simulate import lower_bound, simulate
from seqmesh.scheduler.static import static_plan

# The bucketed MILP rarely improves on the heuristic in under a second (measured: never at 64
# ranks x 512 sequences within 5 s), so per-step planning only runs it when given that long.
BUCKETED_MIN_S = 1.0


def adaptive_plan(lengths: Sequence[int], gpus: int, cost_model: CostModel, *,
                  group_sizes: Sequence[int] | None = None, time_limit_s: float = 0.2,
                  use_milp: bool = True) -> Plan:
    """Plan one step; ``time_limit_s`` bounds the MILP (the heuristic answer is always there)."""
    t0 = time.perf_counter()
    inst = Instance.build(lengths, gpus, cost_model, group_sizes)
    lb = lower_bound(inst.lengths, gpus, cost_model, inst.sizes)
    sched, _ = heuristic(inst, lb - cost_model.grad_reduce_ms)
    plan = inst.to_plan(sched)
    best = (simulate(plan, inst.lengths, cost_model), plan, "heuristic")
    heuristic_ms = (time.perf_counter() - t0) * 1e3
    milp_status = "skipped"
    remaining = time_limit_s - heuristic_ms / 1e3
    # the exact model runs under its node limit alone, except under PP (slower: the time limit bounds it)
    quick = exact_fits(inst.lengths.size, gpus) and inst.pp == 1
    if use_milp and (quick or (time_limit_s >= BUCKETED_MIN_S and remaining > 0)) and best[0] > lb * (1 + 1e-9):
        found = solve_milp(inst, sched, remaining)
        milp_status = "no answer" if found is None else found[1]
        if found is not None:
            fin, above = finish_times(inst, found[0])
            milp_sched, _ = repair(inst, found[0], fin, above)
            answers = [milp_sched]
            if inst.pp > 1:
                answers = [found[0], pipeline_repack(inst, found[0])[0], pipeline_repack(inst, milp_sched)[0]]
            for answer in answers:
                milp_plan = inst.to_plan(answer)
                ms = simulate(milp_plan, inst.lengths, cost_model)
                if ms < best[0] * (1 - 1e-9):
                    best = (ms, milp_plan, "milp")
    # Every static SP degree is one answer of the same problem: the adaptive plan is never worse.
    # A degree whose work alone (area over the ranks) already exceeds the best is not packed.
    for sp in inst.sizes if len(lengths) else ():
        if gpus % sp or max(lengths) > cost_model.capacity(sp):
            continue
        if float(np.sum(cost_model.seq_ms(inst.lengths, sp))) * sp / gpus < best[0]:
            static = static_plan(lengths, gpus, sp, cost_model)  # priced by the same simulator
            if static.predicted_ms < best[0] * (1 - 1e-9):
                best = (static.predicted_ms, static, f"static-sp={sp}")
    ms, plan, solver = best
    out = plan_from_assignment(gpus, [[(g.first, g.count, g.sequences) for g in mb.groups]
                                      for mb in plan.microbatches], ms, lb)
    out.meta.update(solver=solver, milp_status=milp_status, heuristic_ms=heuristic_ms,
                    solve_ms=(time.perf_counter() - t0) * 1e3)
    return out
