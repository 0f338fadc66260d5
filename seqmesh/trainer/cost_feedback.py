"""Closing the loop between the scheduler's cost model and the step times it predicts.

Every group a rank runs is timed (``SpanTimer``); the group's first rank reports
``(lengths, group size, ms)``. Rank 0 keeps a window of these observations and, every
``refine_every`` steps, refits the cost model (``seqmesh.scheduler.profiler.refine``: alpha1,
alpha2, beta and per-size all-to-all bandwidth by non-negative least squares) together with the
measured rest of the step (data, plan broadcast, gradient reduction, optimizer), so the planner's
predictions track the real machine even when the profile came from micro-benchmarks or from no
profile at all.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Sequence

from seqmesh.scheduler import CostModel
from seqmesh.scheduler.profiler import refine

Observation = tuple[tuple[int, ...], int, float]


class CostFeedback:
    def __init__(self, cost_model: CostModel, refine_every: int, window: int = 512) -> None:
        self.cost_model = cost_model
        self.refine_every = refine_every
        self.groups: collections.deque[Observation] = collections.deque(maxlen=window)
        self.tails: collections.deque[float] = collections.deque(maxlen=64)
        self.refits = 0

    def observe(self, groups: Sequence[Observation], tail_ms: float) -> None:
        """Add one step's group timings (from every rank) and its end-of-step cost."""
        self.groups.extend(groups)
        self.tails.append(tail_ms)

    def maybe_refine(self, step: int) -> CostModel | None:
        """A refitted cost model every ``refine_every`` steps (None otherwise, or with too few timings)."""
        if not self.refine_every or (step + 1) % self.refine_every:
            return None
        try:
            fitted = refine(self.cost_model, list(self.groups))
        except ValueError:
            return None
        self.cost_model = dataclasses.replace(fitted, grad_reduce_ms=statistics.median(self.tails))
        self.refits += 1
        return self.cost_model
