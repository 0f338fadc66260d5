"""The wide level's consolidation (scheduler.consolidate): long sequences only move into wider
micro-batches with memory for them, none is lost or doubled, the answer is deterministic, and on
real long-tail lengths under a large beta it is what brings the plan close to the certified bound."""

import dataclasses

import numpy as np
from hypothesis import HealthCheck, given, settings

from seqmesh.scheduler import check_plan, lower_bound
from seqmesh.scheduler.consolidate import consolidate
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.greedy import _best_refill, finish_times, heuristic, repair, split_level
from seqmesh.scheduler.instance import Instance

from tests.test_scheduler_refill import ROOT, _build, _wikipedia, instances


def _consolidated(inst: Instance, ms: float, sched):
    wide, single = split_level(inst, sched, ms)
    short = np.asarray(single, dtype=np.int64)
    return wide, single, consolidate(inst, wide, finish_times(inst, wide)[0], ms, short, 4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_consolidation_keeps_every_long_sequence_once_within_memory(case):
    inst, cm = _build(*case)
    if inst is None:
        return
    lb = lower_bound(inst.lengths, inst.gpus, cm) - cm.grad_reduce_ms
    sched, ms = heuristic(inst, lb, refill_level=False)
    wide, _, merged = _consolidated(inst, ms, sched)
    before = {i: d for (_, d), mbs in wide.items() for ids in mbs for i in ids}
    after = {i: d for (_, d), mbs in merged.items() for ids in mbs for i in ids}
    assert sorted(i for mbs in merged.values() for ids in mbs for i in ids) == sorted(before)
    assert all(after[i] >= before[i] for i in before)  # only ever wider
    for (first, d), mbs in merged.items():
        assert first % d == 0 and all(inst.lengths[ids].sum() <= inst.capacity[d] for ids in mbs)
    assert _consolidated(inst, ms, sched)[2] == merged


def test_consolidation_closes_the_gap_on_real_lengths_with_a_large_beta():
    # FlexSP's GPT-7B model at 1024 ranks, real Wikipedia batch 2: a 179K-token sequence's 128-rank
    # group has ~0.7 s left that short riders fill at 3x their single-rank cost; the 16- and
    # 32-rank groups' long sequences ride there instead and their ranks join the single-rank level.
    cm = dataclasses.replace(CostModel.load(ROOT / "conf" / "cost_models" / "flexsp_gpt7b.json"),
                             extrapolate_bandwidth=True)
    lengths = _wikipedia(3 * 8192)[2 * 8192:]
    inst = Instance.build(lengths, 1024, cm)
    lb = lower_bound(lengths, 1024, cm)
    sched, ms = heuristic(inst, lb, refill_level=False)
    wide, single, _ = _consolidated(inst, ms, sched)
    refilled_ms = repair(inst, *_best_refill(inst, wide, single, ms))[1]
    best, best_ms = heuristic(inst, lb)
    assert best_ms < 0.99 * refilled_ms
    widest = max(d for _, d in best)
    assert sum(1 for (_, d), mbs in best.items() if d == widest for ids in mbs for i in ids if inst.dmin[i] > 1) >= 2
    check_plan(inst.to_plan(best), lengths, cm)
