"""A certified lower bound on the step time: the LP relaxation of a rank-class formulation.

Issue 4's bound (``simulate.lower_bound``) spreads beta over the ranks fractionally: a rank whose
share of tokens is 1.3 micro-batches pays 1.3 betas in it, while every real plan pays 2 (or
leaves tokens to others). When beta is a large part of the step (FlexSP's GPT-7B model: 629 ms
against ~1.1 s of compute per full micro-batch) that is most of the distance between the bound
and any plan, so a planner cannot be judged against it. This bound sees the integer micro-batch
counts and stays a bound for every plan, whatever the planner.

**Formulation.** Fix a step time ``T``. Classify each rank of a plan by ``(k, m)``: the number of
single-rank micro-batches it runs and the number of wider micro-batches it takes part in. A rank of
class ``(k, m)`` pays ``(k + m)`` betas, holds at most ``k`` single-rank memories of tokens and
``m`` shares (tokens / group size) of wider ones, and its nominal time is at most ``T`` times its
speed (less the pipeline's fill and drain, ``(pp - 1)`` of its largest item, at least one beta).
A sequence runs on a rank of that class only if ``(k + m)`` betas plus its own time fit. The LP
variables are, per class (and per distinct rank speed), the number of ranks ``n``, the fraction of
each length's sequences run alone on them, and the rank-participations of each length at each
wider group size (a group of ``d`` counts ``d`` of them, each covering ``1/d`` of the sequence).
A rank with exactly one wider micro-batch is in one group of one size ``d``, so its class is
``(k, 1, d)``: only pieces at size ``d`` count on it, and its share is ``capacity(d) / d``. Without
that split the LP filled such a rank's one wide micro-batch with pieces of sequences at other,
cheaper sizes, and paid one beta for what real plans run as two groups: on real Wikipedia lengths
at 1024 ranks it put 1.65 betas on a rank where every plan found pays 2, and the bound rose from
1.06x to 1.10x of issue 4's with the split. Ranks with two or more wider micro-batches may mix
sizes between them, so their classes keep every size. A rank holds at most one piece of each
sequence (a group's ranks are distinct), so a class's ranks hold at most ``count x n`` pieces of
one length's sequences; written for the lengths that need more than 4 ranks, it stops the LP from
stacking a long sequence's pieces on a few ranks (64 ranks of real Wikipedia lengths, a 93K-token
sequence on 32 ranks: 1.09x -> 1.12x of issue 4's bound).
Every plan of makespan ``<= T`` maps onto a feasible point (count its ranks per class), so when
the LP needs more ranks than there are, no plan finishes within ``T``. The largest ``T`` proven
infeasible this way (bisection, each step one HiGHS LP) is the bound; sequences of equal length
are one row, so the LP has (distinct lengths x group sizes x classes) columns. What it still
relaxes: a sequence's time may be split between ranks of a class (exact for many short sequences
per micro-batch, loose for a few long ones), wide groups' ranks need not be the same ranks, and
ranks with several wide micro-batches may mix group sizes within one.

The bound is >= issue 4's (it takes the larger) and <= the exact MILP's optimum on every
instance the tests try. It costs a few LP solves, so it is opt-in (``plan_step(certify=True)``,
``seqmesh plan --certify``), never part of a trainer's per-step planning by default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import highspy
import numpy as np
from scipy import sparse

from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.simulate import lower_bound, plannable_sizes, smallest_holding_size

# Micro-batch counts per rank are enumerated up to this; the last class stands for "this many or
# more" (its memory row is dropped, it pays this many betas), so the LP stays small and valid.
_MAX_COUNT = 6
# Bisection stops when the bracket is this narrow (relative); the bound is its lower end.
_REL_TOL = 1e-3
# The LP must need this much more than the available ranks before T counts as infeasible (HiGHS
# solves to ~1e-7 relative; a margin far above that keeps the certificate honest).
_INFEASIBLE_MARGIN = 1e-6


@dataclass(frozen=True)
class Bound:
    """A certified bound and how it was reached."""

    certified_ms: float   # no plan of this batch is faster (gradient reduction included)
    simple_ms: float      # issue 4's bound, for comparison
    lp_solves: int
    seconds: float


class _Data:
    """Per distinct length: count, tokens, and time at each group size (nominal, without beta)."""

    def __init__(self, lengths: np.ndarray, gpus: int, cm: CostModel, sizes: Sequence[int]) -> None:
        self.len, self.count = np.unique(lengths, return_counts=True)
        self.sizes = tuple(sizes)
        self.cap = {d: cm.capacity(d) for d in sizes}
        self.fits = {d: self.len <= self.cap[d] for d in sizes}
        self.t = {d: np.asarray(cm.seq_ms(self.len.astype(np.float64), d), dtype=np.float64) for d in sizes}
        self.beta, self.pp = cm.microbatch_ms, cm.pp
        speed = cm.rank_speed(gpus)
        self.speeds, self.speed_count = np.unique(speed, return_counts=True)
        wide = [d for d in sizes if d > 1]
        # lengths no group of 4 holds: the rows that keep one rank to one piece of a sequence are
        # written for these (long sequences, few of each length, spread over many ranks: where the
        # LP stacked pieces on few ranks). For the many shorter wide ones the rows tightened nothing
        # measurable on real Wikipedia lengths and tripled the LP's time at 1024 ranks.
        small = [d for d in sizes if d <= 4]
        self.wide_only = ~self.fits[max(small)] if small else np.ones(self.len.size, dtype=bool)
        self.wide = wide


def _classes(data: _Data, budget: float) -> list[tuple[int, int, bool, bool, tuple[int, ...]]]:
    """(k, m, k open-ended, m open-ended, wide sizes) classes whose betas fit ``budget`` (nominal ms).

    A rank with exactly one wider micro-batch takes part in one group, of one size: its class
    names that size (so the LP cannot fill the rest of that micro-batch with pieces of sequences run
    at other, cheaper sizes). Ranks with several wider micro-batches may mix sizes between them,
    so their classes keep every size (relaxed, still a bound)."""
    most = math.inf if data.beta <= 0 else math.floor(budget / data.beta * (1 + 1e-12))
    kmax = min(most, _MAX_COUNT) if 1 in data.sizes else 0
    mmax = min(most, _MAX_COUNT) if data.wide else 0
    out = []
    for k in range(kmax + 1):
        for m in range(mmax + 1):
            if k + m == 0 or (k + m) * data.beta > budget * (1 + 1e-12):
                continue
            k_open, m_open = k == _MAX_COUNT and most > _MAX_COUNT, m == _MAX_COUNT and most > _MAX_COUNT
            if m == 1 and not m_open:
                out.extend((k, m, k_open, m_open, (d,)) for d in data.wide)
            else:
                out.append((k, m, k_open, m_open, tuple(data.wide)))
    return out


def _ranks_needed(data: _Data, target_ms: float) -> float:
    """The LP's least ``lambda`` such that ``lambda`` times each speed group's ranks run the batch
    within ``target_ms`` (inf when some length cannot run within it at all)."""
    cols_cost: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    row_hi: list[float] = []
    row_lo: list[float] = []
    n_types = data.len.size
    cover_rows = n_types
    covered = np.zeros(n_types, dtype=bool)
    lam = 0
    cols_cost.append(1.0)
    r = cover_rows
    speed_rows = {}
    for v in range(data.speeds.size):
        speed_rows[v] = r
        rows.append(r), cols.append(lam), vals.append(-float(data.speed_count[v]))
        row_lo.append(-np.inf), row_hi.append(0.0)
        r += 1
    bubble = data.pp - 1
    for v, pace in enumerate(data.speeds.tolist()):
        budget = target_ms * pace - bubble * data.beta  # each rank's items, nominal, less fill and drain
        if budget <= 0:
            continue
        for k, m, k_open, m_open, wide in _classes(data, budget):
            n_col = len(cols_cost)
            cols_cost.append(0.0)
            rows.append(speed_rows[v]), cols.append(n_col), vals.append(1.0)
            mem1, mem2, time_row = r, r + 1, r + 2
            r += 3
            room = target_ms * pace - (k + m) * data.beta  # for one item's own time, with its pipeline share
            per_item = {d: data.t[d] + bubble * (data.beta + data.t[d]) for d in data.sizes}
            share = max((data.cap[d] / d for d in wide), default=0.0)  # tokens per wide participation
            terms = [(mem1, -float(k * data.cap[1]) if k else 0.0), (mem2, -float(m * share)),
                     (time_row, (k + m) * data.beta - budget)]
            for row, val in terms:
                rows.append(row), cols.append(n_col), vals.append(val)
            if k:
                ok = np.flatnonzero(data.fits[1] & (per_item[1] <= room * (1 + 1e-12)))
                for j in ok.tolist():
                    c = len(cols_cost)
                    cols_cost.append(0.0)
                    rows.extend((j, mem1, time_row)), cols.extend((c, c, c))
                    vals.extend((1.0, float(data.len[j]), float(data.t[1][j])))
                covered[ok] = True
            pieces: dict[int, list[int]] = {}
            if m:
                for d in wide:
                    ok = np.flatnonzero(data.fits[d] & (per_item[d] <= room * (1 + 1e-12)))
                    for j in ok.tolist():
                        c = len(cols_cost)
                        cols_cost.append(0.0)
                        rows.extend((j, mem2, time_row)), cols.extend((c, c, c))
                        vals.extend((1.0 / d, float(data.len[j]) / d, float(data.t[d][j])))
                        if data.wide_only[j]:
                            pieces.setdefault(j, []).append(c)
                    covered[ok] = True
            # an open-ended class ("this many or more") has no memory row: any count holds its tokens
            row_lo.extend((-np.inf,) * 3)
            row_hi.extend((np.inf if k_open else 0.0, np.inf if m_open else 0.0, 0.0))
            # a rank holds at most one piece of each sequence (a group's ranks are distinct), so
            # these ranks hold at most count x n pieces of a length's sequences
            for j, piece_cols in pieces.items():
                rows.extend([r] * (len(piece_cols) + 1)), cols.extend(piece_cols + [n_col])
                vals.extend([1.0] * len(piece_cols) + [-float(data.count[j])])
                row_lo.append(-np.inf), row_hi.append(0.0)
                r += 1
    if not covered.all():
        return math.inf
    a = sparse.csc_matrix((vals, (rows, cols)), shape=(r, len(cols_cost)))
    lo = np.concatenate([data.count.astype(np.float64), np.array(row_lo)])
    hi = np.concatenate([np.full(n_types, np.inf), np.array(row_hi)])
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.col_cost_ = np.array(cols_cost)
    lp.col_lower_, lp.col_upper_ = np.zeros(a.shape[1]), np.full(a.shape[1], np.inf)
    lp.row_lower_, lp.row_upper_ = lo, hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    h = highspy.Highs()
    for key, value in (("output_flag", False), ("threads", 1), ("random_seed", 0)):
        h.setOptionValue(key, value)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return math.inf
    if status != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"certified bound: HiGHS ended with {h.modelStatusToString(status)} on an LP that "
                           "always has a finite optimum when feasible; the bound cannot be certified")
    return float(h.getInfo().objective_function_value)


def certified_bound(lengths: Sequence[int], gpus: int, cost_model: CostModel, *,
                    group_sizes: Sequence[int] | None = None, upper_ms: float | None = None) -> Bound:
    """The certified bound (see the module docstring) of one batch, in ms.

    ``upper_ms``, a step time known to be reachable (a plan's), caps the bisection; without it
    the bracket grows from issue 4's bound until the LP is feasible.
    """
    t0 = time.perf_counter()
    arr = np.asarray([int(n) for n in lengths], dtype=np.int64)
    sizes = plannable_sizes(gpus, cost_model, group_sizes)
    simple = lower_bound(arr, gpus, cost_model, sizes)
    if not arr.size:
        return Bound(simple, simple, 0, time.perf_counter() - t0)
    smallest_holding_size(int(arr.max()), cost_model, sizes)  # the capacity error, if any
    data = _Data(arr, gpus, cost_model, sizes)
    reduce_ms = cost_model.grad_reduce_ms
    lo = simple - reduce_ms
    solves = 0

    def infeasible(target: float) -> bool:
        nonlocal solves
        solves += 1
        return _ranks_needed(data, target) > 1 + _INFEASIBLE_MARGIN

    if not infeasible(lo):
        return Bound(simple, simple, solves, time.perf_counter() - t0)
    hi = lo * 1.25 if upper_ms is None else max(upper_ms - reduce_ms, lo)
    while infeasible(hi):
        lo, hi = hi, hi * 1.25
    while hi - lo > _REL_TOL * hi:
        mid = 0.5 * (lo + hi)
        if infeasible(mid):
            lo = mid
        else:
            hi = mid
    return Bound(max(lo + reduce_ms, simple), simple, solves, time.perf_counter() - t0)
