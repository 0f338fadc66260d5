"""seqmesh.scheduler: per-step placement of sequences onto sequence-parallel groups.

Pure planning code (no torch.distributed): it runs on the Ray actor or side process that plans
one step ahead. ``plan_step`` is the one entry point the trainer calls.
"""

from __future__ import annotations

from typing import Sequence

from seqmesh.scheduler.cost_model import CostModel, default_cost_model
from seqmesh.scheduler.plan import Group, MicroBatch, Plan
from seqmesh.scheduler.simulate import assign_modes, check_plan, lower_bound, simulate
from seqmesh.scheduler.static import static_plan

__all__ = ["CostModel", "Group", "MicroBatch", "Plan", "check_plan", "default_cost_model", "lower_bound",
           "plan_step", "simulate", "static_plan"]


def plan_step(lengths: Sequence[int], gpus: int, cost_model: CostModel, *, policy: str = "adaptive", sp: int = 1,
              group_sizes: Sequence[int] | None = None, time_limit_s: float = 0.2, certify: bool = False) -> Plan:
    """The plan of one training step: ``policy="static"`` cuts the ranks into fixed groups of ``sp``
    (sp=1: data parallel); ``"adaptive"`` re-chooses groups and micro-batches from the lengths.

    ``certify`` also solves the certified bound (seqmesh.scheduler.bound) and puts it and the
    plan's gap to it in ``plan.meta``; it costs a few LP solves (tenths of a second at 64 ranks),
    so a trainer planning every step leaves it off and the offline tools turn it on.
    """
    if policy == "static":
        plan = static_plan(lengths, gpus, sp, cost_model)
        group_sizes = [sp]
    elif policy == "adaptive":
        from seqmesh.scheduler.adaptive import adaptive_plan

        plan = adaptive_plan(lengths, gpus, cost_model, group_sizes=group_sizes, time_limit_s=time_limit_s)
    else:
        raise ValueError(f"scheduler policy {policy!r} is not known; choose 'adaptive' or 'static'")
    plan = assign_modes(plan, lengths, cost_model)
    if certify:
        from seqmesh.scheduler.bound import certified_bound

        bound = certified_bound(lengths, gpus, cost_model, group_sizes=group_sizes, upper_ms=plan.predicted_ms)
        plan.meta.update(certified_bound_ms=bound.certified_ms, certify_s=bound.seconds,
                         gap_to_certified_bound=plan.predicted_ms / bound.certified_ms if bound.certified_ms else 1.0)
    return plan
