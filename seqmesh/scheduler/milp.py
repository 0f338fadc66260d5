"""The exact planner: a MILP over blocks and length buckets, solved by HiGHS.

Variables: ``x[b, k, j]``, how many sequences of bucket ``j`` run in micro-batch slot ``k`` of
block ``b``; ``y[b, k]``, micro-batches opened in that slot; ``M``, the step time. Constraints:
every bucket placed exactly; a slot's tokens within ``y`` micro-batches of the block's memory;
every rank's finish (the sum over the blocks containing it of beta per micro-batch plus its
sequences' times, at the block's pace) at most ``M``. Minimise ``M``.

Two resolutions of the same model:

* **exact** (sequences x ranks <= EXACT_MAX_WORK: one sequence per bucket, each slot one binary micro-batch): its
  optimum is the optimum over all block schedules, which tests check against brute force.
* **bucketed** (large instances): lengths grouped into buckets of about equal total time (the
  long sequences end up alone in theirs), one aggregate slot per block whose ``y`` counts its
  micro-batches; the answer is turned back into sequences and re-packed best-fit, and only the
  simulator's verdict on the result counts.

Under PP (``pp > 1``) the exact model also has ``u[r]``, rank ``r``'s largest micro-batch (at
least the stage time of every slot containing it), and a rank's finish gains ``(pp - 1) u[r]``,
the pipeline's fill and drain: the simulator's pipelined makespan, exactly. A block may then need
a micro-batch per sequence (splitting shrinks ``u``), so it gets that many slots; that model
takes seconds rather than milliseconds, so it runs under the wall-clock limit like the bucketed
one (measured within ~1.5% of the heuristic at 2 ranks x 12 sequences, in 1-4 s). The bucketed
model leaves the fill and drain out (its slots are aggregates); the adaptive planner re-splits its
answer and lets the simulator judge.

The heuristic's schedule is passed in as the starting incumbent, so HiGHS only ever reports
something at least as good under the model. Determinism: HiGHS runs single-threaded with a node
limit; an answer cut short by the wall-clock limit instead (only the bucketed mode has one: a
slow or loaded machine) is discarded, so the plan does not depend on timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import highspy
import numpy as np
from scipy import sparse

from seqmesh.scheduler.instance import Instance, Schedule
from seqmesh.scheduler.packing import best_fit_decreasing

# The exact model grows with sequences x ranks; up to this product HiGHS proves optimality in
# 0.01-1.4 s on one core (measured); beyond it the node limit usually stops it first. The exact
# mode runs without a wall-clock limit (its node limit bounds it), so its answer never depends
# on the machine's load.
EXACT_MAX_WORK = 24


def exact_fits(n_sequences: int, gpus: int) -> bool:
    return 0 < n_sequences * gpus <= EXACT_MAX_WORK
_NODE_LIMIT = 400


@dataclass
class _Model:
    blocks: list[tuple[int, int]]            # (first, size)
    buckets: list[np.ndarray]                # member sequence ids, longest first
    slots: list[tuple[int, int]]             # (block index, slot) for each y column
    xcols: list[tuple[int, int, int]]        # (y column, bucket, count upper bound) for each x column
    exact: bool


def _buckets(inst: Instance, exact: bool, max_buckets: int) -> list[np.ndarray]:
    order = np.lexsort((np.arange(inst.lengths.size), -inst.lengths))
    if exact:
        return [np.array([i]) for i in order]
    t1 = inst.times[inst.sizes[0]][order]
    share = t1.sum() / max_buckets
    out: list[list[int]] = []
    acc = 0.0
    for i, t in zip(order.tolist(), t1.tolist()):
        if not out or acc >= share or inst.dmin[out[-1][0]] != inst.dmin[i]:
            out.append([])
            acc = 0.0
        out[-1].append(i)
        acc += t
    return [np.array(b) for b in out]


def _build(inst: Instance, exact: bool, max_buckets: int) -> _Model:
    buckets = _buckets(inst, exact, max_buckets)
    blocks = [(b * d, d) for d in inst.sizes for b in range(inst.gpus // d)]
    slots: list[tuple[int, int]] = []
    xcols: list[tuple[int, int, int]] = []
    for bi, (_, d) in enumerate(blocks):
        eligible = [j for j, m in enumerate(buckets) if inst.dmin[m[0]] <= d]
        if not eligible:
            continue
        # An optimal schedule needs at most one micro-batch per block that is at most half full
        # (merging two such saves a beta and changes nothing else), hence this many slots.
        tokens = sum(int(inst.lengths[buckets[j]].sum()) for j in eligible)
        n_items = sum(len(buckets[j]) for j in eligible)
        n_slots = (n_items if inst.pp > 1 else min(n_items, 2 * tokens // inst.capacity[d] + 1)) if exact else 1
        for k in range(n_slots):
            slots.append((bi, k))
            for j in eligible:
                xcols.append((len(slots) - 1, j, len(buckets[j])))
    return _Model(blocks, buckets, slots, xcols, exact)


def _bubble(inst: Instance, model: _Model) -> int:
    """Coefficient of ``u[r]`` in rank ``r``'s finish: ``pp - 1`` in the exact model, else 0 (no ``u``)."""
    return inst.pp - 1 if model.exact else 0


def _matrices(inst: Instance, model: _Model):
    """Column bounds, costs and the constraint matrix (rows: buckets, slot capacity, ranks, order;
    under PP also slot time <= u). Columns: y, x, u (PP only), M."""
    n_y, n_x = len(model.slots), len(model.xcols)
    bubble = _bubble(inst, model)
    n_u = inst.gpus if bubble else 0
    n_col = n_y + n_x + n_u + 1
    m_col = n_col - 1
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    members_len = [inst.lengths[m] for m in model.buckets]
    mean_len = [float(v.mean()) for v in members_len]
    by_bucket: dict[int, list[int]] = {}
    by_slot: dict[int, list[int]] = {}
    for c, (y, j, _) in enumerate(model.xcols):
        by_bucket.setdefault(j, []).append(n_y + c)
        by_slot.setdefault(y, []).append(c)
    for j, m in enumerate(model.buckets):                    # each bucket placed exactly
        for c in by_bucket[j]:
            rows.append(r), cols.append(c), vals.append(1.0)
        lo.append(len(m)), hi.append(len(m))
        r += 1
    for y, (bi, _) in enumerate(model.slots):               # slot memory
        cap = inst.capacity[model.blocks[bi][1]]
        for c in by_slot.get(y, []):
            rows.append(r), cols.append(n_y + c), vals.append(mean_len[model.xcols[c][1]])
        rows.append(r), cols.append(y), vals.append(-float(cap))
        lo.append(-np.inf), hi.append(0.0)
        r += 1
    rank_rows = r
    for y, (bi, _) in enumerate(model.slots):               # rank finish <= M
        first, d = model.blocks[bi]
        pace = float(inst.block_speed[d][first // d])
        terms = [(y, inst.beta / pace)]
        for c in by_slot.get(y, []):
            j = model.xcols[c][1]
            terms.append((n_y + c, float(inst.t(d, first)[model.buckets[j]].mean()) / pace))
        for rank in range(first, first + d):
            for col, v in terms:
                rows.append(rank_rows + rank), cols.append(col), vals.append(v)
    for rank in range(inst.gpus):
        rows.append(rank_rows + rank), cols.append(m_col), vals.append(-1.0)
        if bubble:
            rows.append(rank_rows + rank), cols.append(n_y + n_x + rank), vals.append(float(bubble))
        lo.append(-np.inf), hi.append(0.0)
    r = rank_rows + inst.gpus
    if bubble:                                               # a slot's stage time <= u of each of its ranks
        for y, (bi, _) in enumerate(model.slots):
            first, d = model.blocks[bi]
            pace = float(inst.block_speed[d][first // d])
            terms = [(y, inst.beta / pace)] + [
                (n_y + c, float(inst.t(d, first)[model.buckets[model.xcols[c][1]]].mean()) / pace)
                for c in by_slot.get(y, [])]
            for rank in range(first, first + d):
                for col, v in terms:
                    rows.append(r), cols.append(col), vals.append(v)
                rows.append(r), cols.append(n_y + n_x + rank), vals.append(-1.0)
                lo.append(-np.inf), hi.append(0.0)
                r += 1
    if np.ptp(inst.speed) == 0 and inst.cost_model.links is None:
        # Sibling blocks (the two halves of a block) with everything nested in them can be swapped
        # without changing any finish time; keep only the order whose left sibling is busier.
        # (Not under a cluster file: the halves may sit behind different links.)
        own: dict[int, list[tuple[int, float]]] = {}
        for y, (bi, _) in enumerate(model.slots):
            first, d = model.blocks[bi]
            own.setdefault(bi, []).append((y, inst.beta))
            for c in by_slot.get(y, []):
                j = model.xcols[c][1]
                own[bi].append((n_y + c, float(inst.t(d, first)[model.buckets[j]].mean())))
        index = {blk: bi for bi, blk in enumerate(model.blocks)}
        for bi, (first, d) in enumerate(model.blocks):
            sib = index.get((first + d, d))
            if first % (2 * d) or sib is None or (2 * d) not in inst.capacity or bi not in own or sib not in own:
                continue
            for col, v in own[bi]:
                rows.append(r), cols.append(col), vals.append(v)
            for col, v in own[sib]:
                rows.append(r), cols.append(col), vals.append(-v)
            lo.append(0.0), hi.append(np.inf)
            r += 1
    if model.exact:                                          # slots of a block fill in order
        for y in range(1, n_y):
            if model.slots[y][0] == model.slots[y - 1][0]:
                rows += [r, r]
                cols += [y - 1, y]
                vals += [1.0, -1.0]
                lo.append(0.0), hi.append(np.inf)
                r += 1
                if bubble:
                    # ... and, under PP, longest first: any order of a block's micro-batches prices
                    # the same, so only this one is searched
                    for yy, sign in ((y - 1, 1.0), (y, -1.0)):
                        first, d = model.blocks[model.slots[yy][0]]
                        rows.append(r), cols.append(yy), vals.append(sign * inst.beta)
                        for c in by_slot.get(yy, []):
                            rows.append(r), cols.append(n_y + c)
                            vals.append(sign * float(inst.t(d, first)[model.buckets[model.xcols[c][1]]].mean()))
                    lo.append(0.0), hi.append(np.inf)
                    r += 1
    a = sparse.csc_matrix((vals, (rows, cols)), shape=(r, n_col))
    col_lo = np.zeros(n_col)
    col_hi = np.concatenate([np.full(n_y, 1.0 if model.exact else np.inf),
                             np.array([u for _, _, u in model.xcols], dtype=float), np.full(n_u + 1, np.inf)])
    cost = np.zeros(n_col)
    cost[m_col] = 1.0
    return a, np.array(lo, float), np.array(hi, float), col_lo, col_hi, cost


def _warm_values(inst: Instance, model: _Model, sched: Schedule, a: sparse.csc_matrix) -> np.ndarray | None:
    """Column values of ``sched`` in ``model`` (None when the schedule does not map onto it)."""
    n_y, n_x = len(model.slots), len(model.xcols)
    bubble = _bubble(inst, model)
    bucket_of = np.empty(inst.lengths.size, dtype=np.int64)
    for j, m in enumerate(model.buckets):
        bucket_of[m] = j
    block_index = {b: i for i, b in enumerate(model.blocks)}
    slot_index = {s: y for y, s in enumerate(model.slots)}
    xcol_index = {(y, j): c for c, (y, j, _) in enumerate(model.xcols)}
    v = np.zeros(a.shape[1])
    for blk, bins in sched.items():
        if blk not in block_index:
            return None
        bi = block_index[blk]
        for k, ids in enumerate(bins):
            y = slot_index.get((bi, k if model.exact else 0))
            if y is None:
                return None
            v[y] += 1.0
            for i in ids:
                c = xcol_index.get((y, int(bucket_of[i])))
                if c is None:
                    return None
                v[n_y + c] += 1.0
            if bubble and ids:
                first, d = blk
                item = (float(inst.t(d, first)[ids].sum()) + inst.beta) / float(inst.block_speed[d][first // d])
                u = v[n_y + n_x + first:n_y + n_x + first + d]
                np.maximum(u, item, out=u)
    if not model.exact:  # aggregate slots: enough micro-batches for the mean-length token count
        mean_len = np.array([float(inst.lengths[m].mean()) for m in model.buckets])
        ycol = np.array([y for y, _, _ in model.xcols], dtype=np.int64)
        jcol = np.array([j for _, j, _ in model.xcols], dtype=np.int64)
        tokens = np.bincount(ycol, weights=v[n_y:n_y + n_x] * mean_len[jcol], minlength=n_y)
        caps = np.array([inst.capacity[model.blocks[bi][1]] for bi, _ in model.slots], dtype=float)
        v[:n_y] = np.maximum(v[:n_y], np.ceil(tokens / caps - 1e-9))
    rank_load = a[len(model.buckets) + n_y:len(model.buckets) + n_y + inst.gpus, :-1] @ v[:-1]
    v[-1] = float(rank_load.max(initial=0.0))
    return v


def _to_schedule(inst: Instance, model: _Model, values: np.ndarray) -> Schedule:
    n_y = len(model.slots)
    counts = np.rint(values[n_y:n_y + len(model.xcols)]).astype(np.int64)
    queue = [[int(i) for i in m] for m in model.buckets]  # longest first; handed out in slot order
    contents: dict[int, list[int]] = {}
    for c, (y, j, _) in enumerate(model.xcols):
        for _ in range(int(counts[c])):
            contents.setdefault(y, []).append(queue[j].pop(0))
    sched: Schedule = {}
    for y, ids in sorted(contents.items()):
        bi, _ = model.slots[y]
        first, d = model.blocks[bi]
        bins = [ids] if model.exact else best_fit_decreasing(ids, inst.lengths, inst.capacity[d])
        sched.setdefault((first, d), []).extend(bins)
    return sched


def solve_milp(inst: Instance, warm: Schedule | None, time_limit_s: float, *, exact: bool | None = None,
               max_buckets: int = 16, node_limit: int = _NODE_LIMIT) -> tuple[Schedule, str] | None:
    """Solve the block MILP; returns (schedule, HiGHS status) or None when it has no usable answer."""
    if exact is None:
        exact = exact_fits(inst.lengths.size, inst.gpus)
    unlimited = exact and inst.pp == 1  # only its node limit bounds it (see the module docstring)
    if inst.lengths.size == 0 or (time_limit_s <= 0 and not unlimited):
        return None
    model = _build(inst, exact, max_buckets)
    a, row_lo, row_hi, col_lo, col_hi, cost = _matrices(inst, model)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, col_lo, col_hi
    lp.row_lower_, lp.row_upper_ = row_lo, row_hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    n_int = len(model.slots) + len(model.xcols)
    lp.integrality_ = ([highspy.HighsVarType.kInteger] * n_int
                       + [highspy.HighsVarType.kContinuous] * (a.shape[1] - n_int))
    h = highspy.Highs()
    for key, value in (("output_flag", False), ("threads", 1), ("random_seed", 0), ("mip_rel_gap", 1e-6),
                       ("time_limit", np.inf if unlimited else float(time_limit_s)), ("mip_max_nodes", int(node_limit))):
        h.setOptionValue(key, value)
    h.passModel(lp)
    if warm is not None:
        start = _warm_values(inst, model, warm, a)
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = start.tolist()
            h.setSolution(sol)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    if h.getModelStatus() == highspy.HighsModelStatus.kTimeLimit or h.getInfo().primal_solution_status != 2:
        return None
    values = np.asarray(h.getSolution().col_value)
    # HiGHS 1.16 has reported a feasible optimum whose integer columns held NaN (sequences then went unplanned):
    # such an answer is not used, and the heuristic's plan stands
    if not np.isfinite(values).all():
        return None
    sched = _to_schedule(inst, model, values)
    planned = sorted(int(i) for bins in sched.values() for ids in bins for i in ids)
    if planned != list(range(inst.lengths.size)):
        return None
    return sched, status
