"""The step-time simulator and the lower bound every plan is judged against.

One simulator prices every plan (planner, baselines, tests, benchmark), so that "better" always
means the same thing. Its rule mirrors the trainer: each rank walks its groups in micro-batch
order, and a group's collectives start only when all of its ranks have arrived, so a group starts
when the last of its ranks is free; the step ends when every rank is done and the gradients are
reduced. A group is priced at its own ranks' links (under a cluster file) and in its SP mode (the
plan's, or else the fastest the cost model allows); ``overlapped_step_ms`` prices the reduction
overlapped with each rank's last backward instead.

With pipeline stages (``cost_model.pp > 1``) an HDP rank is a pipeline, and the trainer runs every
pipeline over the same item positions: plan micro-batch ``k`` is item ``k`` of every rank's 1F1B
schedule, and a rank with no group in it skips it. A group's time is then one stage's time, and a
run of consecutive items costs its stage times plus the fill and drain of ``pp - 1`` stage times
of its largest item: ``(m + pp - 1) t`` for ``m`` equal items, and for unequal ones the makespan
of a flow shop whose machines take the same time per job (``sum t + (pp - 1) max t``, whatever
the order). An idle position between two busy ones empties the pipeline (the next item's forward
waits behind the previous backward in 1F1B: exact for two stages, an upper bound for more), so
the run ends there and pays its drain. Planners keep every rank's items at consecutive positions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from seqmesh.scheduler.cost_model import CapacityError, CostModel
from seqmesh.scheduler.plan import Plan, plan_from_assignment


def allowed_group_sizes(gpus: int, group_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Group sizes a plan may use: powers of two up to ``gpus`` by default (aligned blocks nest)."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be >= 1")
    if group_sizes is None:
        return tuple(2 ** k for k in range(gpus.bit_length()) if 2 ** k <= gpus)
    sizes = sorted({int(d) for d in group_sizes})
    bad = [d for d in sizes if not 1 <= d <= gpus]
    if bad or not sizes:
        raise ValueError(f"group sizes {list(group_sizes)} must be non-empty and lie in 1..{gpus}")
    return tuple(sizes)


def plannable_sizes(gpus: int, cost_model: CostModel, group_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
    """Allowed sizes the cost model can price. By default, the powers of two it prices (1 always);
    a size asked for explicitly that it does not price is an error (``CostModel.unpriced_error``),
    never a guessed time. Without any all-to-all bandwidth (a profile taken on one device) only
    single-rank groups have a known time."""
    sizes = allowed_group_sizes(gpus, group_sizes)
    if cost_model.links is not None:
        cost_model.links.hdp_nodes(gpus, cost_model.tp)  # the file must hold every rank of the plan
    if cost_model.has_comm_prices():
        if group_sizes is None:
            return tuple(d for d in sizes if cost_model.priced(d))
        for d in sizes:
            if not cost_model.priced(d):
                raise cost_model.unpriced_error(d)
        return sizes
    if 1 not in sizes:
        raise ValueError(f"group sizes {list(sizes)} need a2a_GBps in the cost model (attention.p2p_GBps for the ring "
                         "modes; none given); profile all-to-all with `torchrun --nproc-per-node N -m seqmesh profile`, "
                         "give a cluster file (scheduler.cluster) or allow size 1")
    return (1,)


def smallest_holding_size(length: int, cost_model: CostModel, sizes: Sequence[int]) -> int:
    """The smallest allowed group size whose memory holds ``length`` tokens alone.

    Raises the error of issue 4 when none does: the step cannot run, and the user must either
    shorten the sequence or allow larger groups.
    """
    for d in sorted(sizes):
        if cost_model.fits(length, d):
            return d
    d = max(sizes)
    priced = "" if cost_model.extrapolate_bandwidth or not cost_model.a2a_GBps else (
        f" (the cost model prices group sizes up to {max(cost_model.a2a_GBps)}: add larger ones to a2a_GBps, or set "
        "\"extrapolate_bandwidth\": true / `seqmesh plan --extrapolate-bandwidth` to price them with the largest listed)")
    raise CapacityError(
        f"a sequence of {length} tokens fits no group: the largest allowed group ({d} ranks) holds "
        f"{cost_model.capacity(d)} tokens (mem_limit_bytes={cost_model.mem_limit_bytes:.4g}, "
        f"mem_static_bytes={cost_model.mem_static_bytes:.4g}, mem_bytes_per_token={cost_model.mem_bytes_per_token:.4g}); "
        f"truncate or split such sequences in the data pipeline, or allow larger groups{priced}")


def simulate(plan: Plan, lengths: Sequence[int], cost_model: CostModel) -> float:
    """Step time of ``plan`` in ms under ``cost_model`` (makespan + gradient reduction)."""
    return float(rank_finish(plan, lengths, cost_model)[0].max()) + cost_model.grad_reduce_ms


def rank_finish(plan: Plan, lengths: Sequence[int], cost_model: CostModel) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, when its last group ends (ms, fill and drain included) and how long that group took."""
    lengths = np.asarray(lengths, dtype=np.int64)
    last_ms = np.zeros(plan.gpus)
    speed = cost_model.rank_speed(plan.gpus)
    free = np.zeros(plan.gpus)
    bubble = cost_model.pp - 1
    last = np.full(plan.gpus, -1)     # position of each rank's latest item (-1: none yet)
    peak = np.zeros(plan.gpus)        # largest stage time of each rank's current run of items
    for k, mb in enumerate(plan.microbatches):
        for g in mb.groups:
            if not g.sequences:
                continue
            lo, hi = g.first, g.first + g.count
            if bubble:
                drained = (last[lo:hi] >= 0) & (last[lo:hi] < k - 1)
                free[lo:hi] += np.where(drained, bubble * peak[lo:hi], 0.0)
                peak[lo:hi] = np.where(drained, 0.0, peak[lo:hi])
            start = free[lo:hi].max()
            t = cost_model.group_ms(lengths[list(g.sequences)], g.count, speed[lo:hi].min(), first=g.first,
                                    mode=g.mode or None)
            free[lo:hi] = start + t
            last_ms[lo:hi] = t
            if bubble:
                peak[lo:hi] = np.maximum(peak[lo:hi], t)
                last[lo:hi] = k
    if bubble:
        free += bubble * peak
    return free, last_ms


def overlapped_step_ms(plan: Plan, lengths: Sequence[int], cost_model: CostModel, *, reduce_ms: float,
                       buckets: int, backward_share: float) -> float:
    """Step time when ``reduce_ms`` of the gradient reduction runs in ``buckets`` equal buckets during
    each rank's last backward (``parallel.overlap_grad_reduce``); the rest of ``grad_reduce_ms``
    (ZeRO-1/2's parameter all-gather after the optimizer) stays after it.

    The trainer's rule (``seqmesh.parallel.grad_reduce``): every rank launches the buckets in one
    order, each as soon as its last backward has finished the bucket's gradients, and a collective
    runs once every rank has launched it, one at a time on the reduction group. Backward is assumed
    to finish the buckets at an even pace over the last group's ``backward_share`` of its time
    (3/4 with activation checkpointing: recomputed forward and backward; 2/3 without), and the
    collectives not to slow the compute they overlap. The result is at least the makespan plus one
    bucket (the last bucket is ready only at the end) and at most ``simulate``'s step.
    """
    if not 0 <= reduce_ms <= cost_model.grad_reduce_ms:
        raise ValueError(f"reduce_ms={reduce_ms} must lie in [0, grad_reduce_ms={cost_model.grad_reduce_ms}]")
    if cost_model.pp > 1:
        raise ValueError("overlapped_step_ms: the trainer does not overlap the reduction under PP (the pipeline "
                         "reduces after its schedule); price PP plans with simulate")
    if buckets < 1 or not 0 < backward_share <= 1:
        raise ValueError(f"buckets={buckets} must be >= 1 and backward_share={backward_share} in (0, 1]")
    finish, last_ms = rank_finish(plan, lengths, cost_model)
    backward = backward_share * last_ms
    k = np.arange(1, buckets + 1)
    ready = ((finish - backward)[None, :] + np.outer(k / buckets, backward)).max(axis=1)  # all ranks launched
    per = reduce_ms / buckets
    end = float(np.max(ready + (buckets - k + 1) * per))
    return max(end, float(finish.max())) + cost_model.grad_reduce_ms - reduce_ms


def assign_modes(plan: Plan, lengths: Sequence[int], cost_model: CostModel) -> Plan:
    """The plan with each multi-rank group's SP mode set to its fastest (``CostModel.best_mode``),
    when the cost model chooses among several (``attention.choose``): the simulator priced each
    group at that mode already, so the plan's time is unchanged; the trainer runs what it says."""
    if not cost_model.attention.choose:
        return plan
    mbs = [[(g.first, g.count, g.sequences,
             cost_model.best_mode([lengths[s] for s in g.sequences], g.count, g.first) if g.count > 1 else "")
            for g in mb.groups] for mb in plan.microbatches]
    out = plan_from_assignment(plan.gpus, mbs, plan.predicted_ms, plan.lower_bound_ms)
    out.meta.update(plan.meta)
    return out


def check_plan(plan: Plan, lengths: Sequence[int], cost_model: CostModel,
               group_sizes: Sequence[int] | None = None) -> None:
    """Raise ValueError unless ``plan`` covers ``lengths`` exactly once, uses allowed sizes and fits memory."""
    plan.validate(len(lengths))
    sizes = set(plannable_sizes(plan.gpus, cost_model, group_sizes))
    for i, mb in enumerate(plan.microbatches):
        for g in mb.groups:
            if g.count not in sizes:
                raise ValueError(f"micro-batch {i}: group of {g.count} ranks; allowed sizes are {sorted(sizes)}")
            if g.mode and g.count > 1 and g.mode not in cost_model.modes(g.count):
                raise ValueError(f"micro-batch {i}: group at ranks [{g.first}, {g.first + g.count}) runs SP mode "
                                 f"{g.mode!r}; the cost model allows {list(cost_model.modes(g.count))} for it")
            tokens = int(sum(lengths[s] for s in g.sequences))
            if not cost_model.fits(tokens, g.count):
                raise ValueError(f"micro-batch {i}: group at ranks [{g.first}, {g.first + g.count}) holds {tokens} "
                                 f"tokens, over its memory capacity of {cost_model.capacity(g.count)}")


def lower_bound(lengths: Sequence[int], gpus: int, cost_model: CostModel,
                group_sizes: Sequence[int] | None = None) -> float:
    """Issue 4's bound on any plan's step time, in ms.

    The larger of (a) the area bound: each sequence's compute plus the least communication of any
    group size that can hold it, times that size (= rank-milliseconds), summed, plus beta times
    (total tokens / per-rank token capacity), all over the ranks; and (b) the longest sequence
    alone at its best group size plus beta. With speed factors, rank-milliseconds are spread over
    the summed speeds and (b) runs at the fastest rank's pace, so the bound stays a bound; with all
    factors 1 it is exactly the issue's. The plan-independent gradient reduction is added to both.
    With ``pp`` stages times are stage times, and (b) runs the longest sequence's item through all
    ``pp`` stages (fill and drain), so the bound holds for the pipelined makespan too.
    """
    if not len(lengths):
        return cost_model.grad_reduce_ms
    s = np.asarray(lengths, dtype=np.float64)
    if s.min() < 1:
        raise ValueError(f"sequence lengths must be >= 1 token, got {int(s.min())}")
    sizes = plannable_sizes(gpus, cost_model, group_sizes)
    speed = cost_model.rank_speed(gpus)
    cm = cost_model
    compute = cm.alpha1_ms_per_tok2 * s * s + cm.alpha2_ms_per_tok * s
    least_comm = np.full(len(s), np.inf)
    best_time = np.full(len(s), np.inf)
    compute = compute / (cm.tp * cm.pp)
    for d in sizes:
        holds = cm.fits(s, d)
        comm_area = cm.comm_ms(s, d) * d
        least_comm = np.where(holds, np.minimum(least_comm, comm_area), least_comm)
        best_time = np.where(holds, np.minimum(best_time, compute / d + comm_area / d), best_time)
    if not np.isfinite(least_comm).all():
        smallest_holding_size(int(s[~np.isfinite(least_comm)].max()), cm, sizes)
    area = float(compute.sum() + least_comm.sum()) + cm.microbatch_ms * float(s.sum()) / cm.tokens_per_rank()
    bound_a = area / float(speed.sum())
    bound_b = cm.pp * (float(best_time[np.argmax(s)]) + cm.microbatch_ms) / float(speed.max())
    return max(bound_a, bound_b) + cm.grad_reduce_ms
