"""What the step loop measures about a step, besides loss and gradient norm, in one object.

    telemetry.begin_step()
    with telemetry.span("reduce"): ...          # named spans (the runner times "group" spans itself)
    record = telemetry.end_step(step, plan, lengths, plan_wait_ms)  # a collective: every rank

``end_step`` gathers every rank's span timings, peak memory and one-off work (``first_use``),
feeds rank 0's cost feedback (observe the step, refit every ``scheduler.refine_every`` steps) and
returns the step's wall time, the peak memory over ranks, the refitted cost model (None most
steps) and the extra metrics keys: plan statistics, per-rank timing aggregates and values, each
rank's predicted work, refit count and the cost feedback's diagnostics.
"""

from __future__ import annotations

import collections
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from seqmesh import first_use
from seqmesh.parallel.mesh import Mesh
from seqmesh.scheduler import CostModel
from seqmesh.scheduler.plan import Plan
from seqmesh.trainer.cost_feedback import CostFeedback
from seqmesh.trainer.metrics import aggregate_rank_timings, peak_memory
from seqmesh.trainer.timing import SpanTimer


@dataclass
class StepRecord:
    step_time_s: float
    peak_mem_bytes: int  # the max over ranks
    extra: dict[str, Any]  # the metrics keys beyond MetricsLogger.log_step's own
    refined: CostModel | None  # a refitted cost model (rank 0, every refine_every steps), else None


class StepTelemetry:
    """Span timing, per-rank gathering, one-off work, cost feedback and plan statistics of each step.

    ``group_spans``: each "group" span times one plan group (False under a pipeline, whose one span
    covers all groups: the feedback then keeps only step-level figures).
    """

    def __init__(self, mesh: Mesh, device: torch.device, cost_model: CostModel, refine_every: int,
                 group_spans: bool = True) -> None:
        self.mesh, self.device, self.group_spans = mesh, device, group_spans
        self.timer = SpanTimer(device)
        self.feedback = CostFeedback(cost_model, refine_every)
        self.lead = dist.get_rank() == 0  # rank 0 keeps the feedback (and logs)
        self.begin_step()

    def begin_step(self) -> None:
        """Start the step's clock and its record of one-off work."""
        self._t0, self._first_use_before = time.perf_counter(), first_use.counts()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.timer.start(name)
        yield
        self.timer.stop(name)

    def end_step(self, step: int, plan: Plan, lengths: Sequence[int], plan_wait_ms: float) -> StepRecord:
        """Gather the step's measurements (a collective: every rank calls it) and fold them in; ``step`` is
        the 0-based index of the step just run."""
        spans = self.timer.elapsed_ms()
        group_ms = [ms for name, ms in spans if name == "group"]
        timings = {"compute_s": sum(group_ms) / 1e3, "reduce_s": dict(spans)["reduce"] / 1e3,
                   "optimizer_s": dict(spans)["optimizer"] / 1e3, "plan_wait_s": plan_wait_ms / 1e3,
                   "peak_mem_bytes": peak_memory(self.device)[0] or 0, "group_ms": group_ms,
                   "hdp_rank": self.mesh.hdp_rank, "first_use": first_use.since(self._first_use_before)}
        gathered: list[Any] = [None] * self.mesh.world
        dist.all_gather_object(gathered, timings)
        step_time = time.perf_counter() - self._t0
        # Every rank's group spans, in its plan order (one pipeline span under PP: no per-group times).
        rank_spans = [(t.pop("hdp_rank"), t.pop("group_ms")) for t in gathered]
        # One-off work (cuDNN graphs, compiles, new process groups) on any rank keeps the step out of refits.
        one_off = sum((collections.Counter(t.pop("first_use")) for t in gathered), collections.Counter())
        diagnostics, refined = {}, None
        if self.lead:
            diagnostics = self.feedback.observe_step(plan, lengths, rank_spans if self.group_spans else None,
                                                     1e3 * step_time, one_off)
            refined = self.feedback.maybe_refine(step)
        extra = {**plan_stats(plan, step_time), **timing_stats(gathered),
                 "rank_predicted_ms": rank_work_ms(plan, lengths, self.feedback.cost_model, self.mesh),
                 "cost_model_refits": self.feedback.refits, "cost_feedback": diagnostics}
        return StepRecord(step_time, max(t["peak_mem_bytes"] for t in gathered), extra, refined)


def plan_stats(plan: Plan, step_time_s: float) -> dict[str, Any]:
    sizes = plan.group_sizes()
    return {"plan_microbatches": len(plan.microbatches), "plan_groups": len(sizes), "plan_max_group": max(sizes),
            "plan_predicted_ms": plan.predicted_ms, "plan_lower_bound_ms": plan.lower_bound_ms,
            "plan_error": abs(plan.predicted_ms - 1e3 * step_time_s) / (1e3 * step_time_s),
            "plan_group_sizes": sorted(sizes)}


def rank_work_ms(plan: Plan, lengths: Sequence[int], cost_model: CostModel, mesh: Mesh) -> list[float]:
    """The cost model's time of each rank's share of the plan at nominal speed, in world rank order:
    the yardstick of the per-rank speed factors (seqmesh.launch.stragglers)."""
    per_hdp = [0.0] * plan.gpus
    for mb in plan.microbatches:
        for g in mb.groups:
            ms = cost_model.group_ms([lengths[s] for s in g.sequences], g.count, first=g.first)
            for r in g.ranks:
                per_hdp[r] += ms
    return [round(per_hdp[Mesh(mesh.world, r, mesh.tp, mesh.pp).hdp_rank], 3) for r in range(mesh.world)]


def timing_stats(per_rank: list[dict[str, float]]) -> dict[str, Any]:
    agg = aggregate_rank_timings([{k: v for k, v in t.items() if k != "peak_mem_bytes"} for t in per_rank])
    # The per-rank values too (rank order), for the straggler breakdown and speed factors.
    return {**{f"ranks_{k}": v for k, v in agg.items()},
            "rank_timings": {k: [round(t[k], 6) for t in per_rank]
                             for k in ("compute_s", "reduce_s", "optimizer_s", "plan_wait_s")}}
