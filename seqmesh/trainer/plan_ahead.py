"""Plans arrive one step ahead, off the critical path, identical on every rank.

Rank 0 asks the scheduler for step t+1's plan in a side process while step t computes (the
data sampler's lookahead gives the lengths); at step t+1 the plan is broadcast from rank 0 and
every rank checks it: the plan must cover the batch exactly, and all ranks must hold the same
digest (and the same batch). Acting on different plans would hang a collective; here every rank
raises instead, also when only one rank finds the plan wrong.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Sequence

import torch.distributed as dist

from seqmesh.scheduler.cost_model import CapacityError
from seqmesh.scheduler.plan import Plan

CAPACITY_FIX = ("; in a seqmesh run: lower data.max_seq_len (longer documents are split into pieces of at most that "
                "many tokens), raise memory.limit_gb or shard the model states (parallel.zero_stage, "
                "parallel.tp) to free memory, or allow larger SP groups (scheduler.sp under the static policy, "
                "scheduler.group_sizes under the adaptive one)")

PlanFn = Callable[[Sequence[int]], Plan]


class PlanMismatchError(RuntimeError):
    """Ranks disagree on the step's plan."""


class PlanningError(ValueError):
    """The scheduler could not plan a step (raised on every rank, not only the planning one)."""


def _timed(plan_fn: PlanFn, lengths: list[int]) -> tuple[str, float]:
    t0 = time.perf_counter()
    plan = plan_fn(lengths)
    return plan.to_json(), (time.perf_counter() - t0) * 1e3


class PlanAhead:
    """Owns the side process (rank 0 only) and the per-step broadcast + check."""

    def __init__(self, plan_fn: PlanFn, rank: int, background: bool = True) -> None:
        self.plan_fn, self.rank = plan_fn, rank
        self._pending: dict[int, tuple[tuple[int, ...], Future]] = {}
        self._pool = None
        if rank == 0 and background:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.last_solve_ms = 0.0
        self.last_wait_ms = 0.0

    def prefetch(self, step: int, lengths: Sequence[int]) -> None:
        """Start planning ``step`` (rank 0; a no-op elsewhere or without a side process)."""
        if self._pool is None or step in self._pending:
            return
        key = tuple(int(n) for n in lengths)
        self._pending[step] = (key, self._pool.submit(_timed, self.plan_fn, list(key)))

    def replace_plan_fn(self, plan_fn: PlanFn) -> None:
        """Plan with ``plan_fn`` from now on (a refitted cost model), including the steps already
        started with the old one: they are started again, so the next step is priced by the new
        model rather than one step later."""
        self.plan_fn = plan_fn
        stale = {step: key for step, (key, _) in self._pending.items()}
        for _, future in self._pending.values():
            future.cancel()
        self._pending.clear()
        for step, key in stale.items():
            self.prefetch(step, key)

    def get(self, step: int, lengths: Sequence[int], group: "dist.ProcessGroup | None" = None) -> Plan:
        """The plan of ``step``: computed (or awaited) on rank 0, broadcast, validated, digest-checked.

        ``step`` counts from 0, as the loop does; errors name it from 1, as metrics.jsonl logs it."""
        payload: list[object] = [None]
        if self.rank == 0:
            key = tuple(int(n) for n in lengths)
            t0 = time.perf_counter()
            pending = self._pending.pop(step, None)
            try:
                if pending is not None and pending[0] == key:
                    text, self.last_solve_ms = pending[1].result()
                else:
                    text, self.last_solve_ms = _timed(self.plan_fn, list(key))
                payload[0] = text
            except ValueError as e:  # e.g. a sequence no group can hold: every rank must hear it
                fix = CAPACITY_FIX if isinstance(e, CapacityError) else ""
                payload[0] = PlanningError(f"step {step + 1}: no plan for lengths {sorted(key)[-3:]} (longest): {e}{fix}")
            self.last_wait_ms = (time.perf_counter() - t0) * 1e3
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(payload, src=src, group=group)
        if isinstance(payload[0], PlanningError):
            raise payload[0]
        # A check that fails on one rank must fail on all of them, never leave the others waiting in a
        # collective: each rank reports (plan digest, digest of its batch's lengths, its own error).
        batch = hashlib.sha256(",".join(str(int(n)) for n in lengths).encode()).hexdigest()[:16]
        plan, mine = None, None
        try:
            plan = Plan.from_json(payload[0])
            plan.validate(len(lengths))
            mine = (plan.digest(), batch, None)
        except (ValueError, KeyError, TypeError) as e:
            mine = (None, batch, f"{type(e).__name__}: {e}")
        views: list[object] = [None] * dist.get_world_size(group)
        dist.all_gather_object(views, mine, group=group)
        bad = {r: err for r, (_, _, err) in enumerate(views) if err}
        if bad:
            raise PlanMismatchError(f"step {step + 1}: the broadcast plan does not fit the batch of rank(s) {sorted(bad)} "
                                    f"({'; '.join(f'rank {r}: {e}' for r, e in bad.items())}); ranks disagree on the "
                                    f"batch (data or seqmesh version differ between nodes?)")
        if len({d for d, _, _ in views}) != 1 or len({b for _, b, _ in views}) != 1:
            raise PlanMismatchError(f"step {step + 1}: ranks hold different plans or batches (plan digests "
                                    f"{[d for d, _, _ in views]}, batch digests {[b for _, b, _ in views]}); check "
                                    f"that every node runs the same seqmesh version and reads the same data")
        return plan

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
