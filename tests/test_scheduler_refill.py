"""The single-rank refill (greedy.refill) and the certified bound's one-size classes: plans stay
valid and deterministic, the heuristic is never worse with the refill than without it, and on real
long-tail lengths under a large beta the refill is what brings the micro-batch count down."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqmesh.scheduler import check_plan, lower_bound, simulate
from seqmesh.scheduler.bound import _classes, _Data
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.greedy import finish_times, heuristic, refill
from seqmesh.scheduler.instance import Instance
from seqmesh.scheduler.simulate import plannable_sizes

from tests.test_scheduler_planner import model

ROOT = Path(__file__).resolve().parents[1]

instances = st.tuples(
    st.sampled_from([1, 2, 4, 8, 16]),
    st.lists(st.integers(1, 12000), min_size=1, max_size=60),
    st.sampled_from([0.0, 20.0, 300.0, 2000.0]),
    st.sampled_from([1500, 4000, 20000]),
    st.booleans(),
)


def _build(gpus, lengths, beta, cap, slow):
    speed = tuple(0.6 if r == gpus - 1 and slow else 1.0 for r in range(gpus)) if gpus > 1 else ()
    cm = model(beta, cap, speed=speed)
    if max(lengths) > cm.capacity(gpus):
        return None, cm
    return Instance.build(lengths, gpus, cm), cm


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances, st.sampled_from([0.5, 1.0, 1.5]))
def test_refilled_schedules_are_valid_and_deterministic(case, scale):
    inst, cm = _build(*case)
    if inst is None:
        return
    lengths = inst.lengths.tolist()
    lb = lower_bound(lengths, inst.gpus, cm) - cm.grad_reduce_ms
    sched, ms = heuristic(inst, lb, refill_level=False)
    out = refill(inst, sched, ms * scale)
    plan = inst.to_plan(out)
    check_plan(plan, lengths, cm)  # every sequence once, no rank twice in a micro-batch, sizes, memory
    assert inst.to_plan(refill(inst, sched, ms * scale)).digest() == plan.digest()
    # the nested-block finish times the planners use are what the simulator charges
    assert float(finish_times(inst, out)[0].max()) == pytest.approx(simulate(plan, lengths, cm), rel=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances)
def test_heuristic_with_refill_is_never_worse(case):
    inst, cm = _build(*case)
    if inst is None:
        return
    lb = lower_bound(inst.lengths, inst.gpus, cm)
    with_refill = heuristic(inst, lb)
    assert with_refill[1] <= heuristic(inst, lb, refill_level=False)[1] * (1 + 1e-12)
    assert inst.to_plan(heuristic(inst, lb)[0]).digest() == inst.to_plan(with_refill[0]).digest()


def _wikipedia(n: int) -> list[int]:
    """The first ``n`` committed real Wikipedia lengths as bench/scheduler.py reads them."""
    import gzip

    with gzip.open(ROOT / "bench" / "data" / "wikipedia_lengths_head.txt.gz", "rt") as f:
        raw = np.array([int(next(f)) for _ in range(n + 64)], dtype=np.int64)
    padded = -(-raw // 128) * 128
    return padded[padded <= 192_000 - 128][:n].tolist()


def test_refill_cuts_micro_batches_on_real_lengths_with_a_large_beta():
    # FlexSP's GPT-7B model: beta 629 ms against ~1.1 s of compute per full micro-batch. LPT leaves
    # ranks with a third, nearly empty micro-batch; the refill deals each rank the count it needs.
    cm = CostModel.load(ROOT / "conf" / "cost_models" / "flexsp_gpt7b.json")
    lengths = _wikipedia(2048)
    inst = Instance.build(lengths, 256, cm)
    lb = lower_bound(lengths, 256, cm)
    plain, plain_ms = heuristic(inst, lb, refill_level=False)
    sched, ms = heuristic(inst, lb)
    assert ms < 0.98 * plain_ms

    def betas_per_rank(s):
        return sum(d * sum(1 for ids in bins if ids) for (_, d), bins in s.items()) / inst.gpus

    assert betas_per_rank(sched) < betas_per_rank(plain)
    check_plan(inst.to_plan(sched), lengths, cm)


def test_a_rank_with_one_wide_micro_batch_is_priced_at_one_group_size():
    cm = model(300.0, 1500)
    lengths = np.array([500, 2000, 5000, 9000])
    data = _Data(lengths, 8, cm, plannable_sizes(8, cm))
    classes = _classes(data, 5000.0)
    ones = [c for c in classes if c[1] == 1]
    assert ones and all(len(wide) == 1 for *_, wide in ones)
    assert {wide[0] for *_, wide in ones} == {2, 4, 8}
    assert all(wide == (2, 4, 8) for k, m, _, m_open, wide in classes if m >= 2)
