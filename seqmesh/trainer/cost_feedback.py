"""Closing the loop between the scheduler's cost model and the step times it predicts.

Every group a rank runs is timed (``SpanTimer``). Rank 0 turns one step's timers into what the
cost model predicts, so that the two can be compared term by term (``observe_step``):

* a group's time is the *shortest* of its ranks' spans: a rank that reached the group early
  waits inside its span for the others (the group's first collective), and the simulator counts
  that wait as idle time before the group, not as the group's work;
* the step's makespan is the simulator's rule (a group starts when its last rank is free) over
  the measured group times, and the tail (data, plan broadcast, gradient reduction, optimizer,
  host gaps) is the measured step minus that makespan -- so a model that prices every group
  right and carries the median tail predicts the step exactly;
* the first ``warmup_steps`` steps of a process pay one-off costs (communicator set-up, allocator
  growth, kernel selection) that no later step pays; they are reported, never fitted;
* so is any later step in which a rank did one-off work it recorded (``seqmesh.first_use``:
  a cuDNN graph for a new length bucket, a compile, a new process group). A long-tail length mix
  meets new buckets for many steps: in bench/scheduler_gpu.py on 2x H200 the step after warm-up
  ran 1.5-1.75x slower than later ones of similar tokens, and a refit from it over-predicted the
  next two steps by 40-57%.

Every ``refine_every`` steps the window of group timings refits the coefficients
(``seqmesh.scheduler.fitting.refine``), always from the profile the run started with as prior,
so a refit from a few timings moves only what they determine, and one group that stalled once
is dropped as an outlier. The refitted model carries the median tail as ``grad_reduce_ms``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any, Mapping, Sequence

import numpy as np

from seqmesh.scheduler import CostModel, simulate
from seqmesh.scheduler.fitting import refine
from seqmesh.scheduler.plan import Plan

Observation = tuple[tuple[int, ...], int, float]
# A rank's report: (its HDP rank, the ms of each group it ran, in the plan's execution order).
RankSpans = tuple[int, Sequence[float]]

# How far (relative standard deviation) each coefficient is expected to stray from the profile's
# proportions once its level is fitted: the profile stays where a few steps' timings say nothing.
PRIOR_SD = 0.5
# A timing more than this many robust standard deviations off the first fit is a one-off stall.
OUTLIER_SIGMAS = 4.0


class CostFeedback:
    """Rank 0's record of predicted against measured times, and the refits it draws from them."""

    def __init__(self, cost_model: CostModel, refine_every: int, *, warmup_steps: int = 1, window: int = 512,
                 prior_sd: float | None = PRIOR_SD, outlier_sigmas: float | None = OUTLIER_SIGMAS,
                 history: int = 4) -> None:
        if refine_every < 0 or warmup_steps < 0 or window < 1 or history < 1:
            raise ValueError(f"CostFeedback: refine_every={refine_every} and warmup_steps={warmup_steps} must be >= 0, "
                             f"window={window} and history={history} >= 1")
        self.profile = self.cost_model = cost_model
        self.refine_every, self.warmup_steps = refine_every, warmup_steps
        self.prior_sd, self.outlier_sigmas = prior_sd, outlier_sigmas
        self.groups: collections.deque[Observation] = collections.deque(maxlen=window)
        self.tails: collections.deque[float] = collections.deque(maxlen=64)
        self.refits = 0
        self._steps_seen = 0
        # The models a plan still in flight may have been priced with (planning runs a step ahead).
        self.models: collections.deque[tuple[int, CostModel]] = collections.deque([(0, cost_model)], maxlen=history)

    def observe(self, groups: Sequence[Observation], tail_ms: float, one_off: bool = False) -> bool:
        """Add one step's group timings (nominal speed) and its tail; False for a warm-up step or one
        that did ``one_off`` work (not kept)."""
        self._steps_seen += 1
        if self._steps_seen <= self.warmup_steps or one_off:
            return False
        self.groups.extend(groups)
        self.tails.append(tail_ms)
        return True

    def observe_step(self, plan: Plan, lengths: Sequence[int], rank_spans: Sequence[RankSpans] | None,
                     step_ms: float, one_off: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Fold one step's measurements in (see the module docstring) and return its diagnostics.

        ``rank_spans`` holds every rank's report, or None where groups are not timed one by one
        (a pipeline interleaves them): then only the step-level figures are returned. ``one_off``
        counts the first-use events of the step by kind, summed over ranks (``first_use.since``);
        any event keeps the step out of the fit, and the diagnostics carry them as ``one_off``. The
        diagnostics price every group with the model that priced the plan (``plan_model``: 0 for
        the profile, k for the k-th refit, None if no model kept here reproduces its prediction);
        ``groups`` lists ``[micro-batch, first rank, size, sequences, tokens, measured ms, predicted ms]``.
        """
        generation, model = self._pricing_model(plan, lengths)
        out: dict[str, Any] = {"plan_model": generation, "predicted_tail_ms": round(model.grad_reduce_ms, 2),
                               "one_off": {kind: n for kind, n in (one_off or {}).items() if n}}
        if rank_spans is None:
            return out
        measured = _group_times(plan, rank_spans)
        speed = model.rank_speed(plan.gpus)
        free = np.zeros(plan.gpus)
        observations, rows = [], []
        for k, mb in enumerate(plan.microbatches):
            for g in (g for g in mb.groups if g.sequences):
                lens = tuple(int(lengths[s]) for s in g.sequences)
                ms, pace = measured[k, g.first], float(speed[g.first:g.first + g.count].min())
                free[g.first:g.first + g.count] = free[g.first:g.first + g.count].max() + ms
                observations.append((lens, g.count, ms * pace))  # as if at nominal speed, as refine fits
                predicted = model.group_ms(lens, g.count, pace, first=g.first)
                rows.append([k, g.first, g.count, len(lens), sum(lens), round(ms, 2), round(predicted, 2)])
        makespan = float(free.max())
        tail = step_ms - makespan
        out.update(fit=self.observe(observations, tail, one_off=bool(out["one_off"])), makespan_ms=round(makespan, 2),
                   tail_ms=round(tail, 2), predicted_makespan_ms=round(plan.predicted_ms - model.grad_reduce_ms, 2),
                   groups=rows)
        return out

    def maybe_refine(self, step: int) -> CostModel | None:
        """A refitted cost model every ``refine_every`` steps (None otherwise, or before any timing is kept)."""
        if not self.refine_every or (step + 1) % self.refine_every or not self.tails:
            return None
        try:
            fitted = refine(self.profile, list(self.groups), prior_sd=self.prior_sd,
                            outlier_sigmas=self.outlier_sigmas)
        except ValueError:
            return None
        self.cost_model = dataclasses.replace(fitted, grad_reduce_ms=max(statistics.median(self.tails), 0.0))
        self.refits += 1
        self.models.append((self.refits, self.cost_model))
        return self.cost_model

    def _pricing_model(self, plan: Plan, lengths: Sequence[int]) -> tuple[int | None, CostModel]:
        """The kept model whose simulation reproduces the plan's prediction (planners price plans with
        ``simulate``), newest first; else (None, the current model)."""
        for generation, model in reversed(self.models):
            if math.isclose(simulate(plan, lengths, model), plan.predicted_ms, rel_tol=1e-9, abs_tol=1e-9):
                return generation, model
        return None, self.cost_model


def _group_times(plan: Plan, rank_spans: Sequence[RankSpans]) -> dict[tuple[int, int], float]:
    """Each group's time, keyed (micro-batch, first rank): the shortest span among its ranks' reports."""
    times: dict[tuple[int, int], float] = {}
    for hdp_rank, spans in rank_spans:
        work = list(plan.work_of(hdp_rank))
        if len(work) != len(spans):
            raise ValueError(f"HDP rank {hdp_rank} timed {len(spans)} groups but the plan gives it {len(work)}; "
                             "report one span per group the rank runs, in the plan's order")
        for (k, g), ms in zip(work, spans):
            times[k, g.first] = min(times.get((k, g.first), math.inf), float(ms))
    missing = [(k, g.first) for k, mb in enumerate(plan.microbatches) for g in mb.groups if (k, g.first) not in times]
    if missing:
        raise ValueError(f"no rank reported the groups (micro-batch, first rank) {missing[:5]}; every rank's "
                         "spans are needed")
    return times
