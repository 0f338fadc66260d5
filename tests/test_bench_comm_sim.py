"""bench/comm_sim.py on its small configuration, and the overlapped-reduction model it uses.

The bench's figures are ratios of the simulator's step times; these tests check that each reported
gain is that ratio over checked plans, and the overlap model's arithmetic on hand-made plans.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import comm_sim
from seqmesh.scheduler import plan_step, simulate
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.scheduler.simulate import overlapped_step_ms


def flat_model(grad_reduce_ms: float) -> CostModel:
    return CostModel(alpha1_ms_per_tok2=0.0, alpha2_ms_per_tok=1.0, beta_ms=0.0, a2a_GBps={2: 100.0},
                     comm_bytes_per_token=0.0, mem_bytes_per_token=1.0, mem_static_bytes=0.0, mem_limit_bytes=1e6,
                     grad_reduce_ms=grad_reduce_ms)


def test_overlap_hides_buckets_behind_the_last_backward():
    # two ranks, one sequence each: 100 ms and 60 ms groups, so rank 0 finishes at 100, rank 1 at 60
    cm = flat_model(grad_reduce_ms=50.0)
    plan = plan_from_assignment(2, [[(0, 1, [0]), (1, 1, [1])]])
    lengths = [100, 60]
    assert simulate(plan, lengths, cm) == 150.0
    # 40 ms of reduce in 4 buckets, backward = last 3/4 of each group: rank 0's buckets are ready at
    # 25 + 18.75 k (the later of the two ranks), so they end at 100 + 10 = 110; the 10 ms rest follows
    assert overlapped_step_ms(plan, lengths, cm, reduce_ms=40.0, buckets=4, backward_share=0.75) == pytest.approx(120.0)
    # a reduction longer than the backward queues up: 400 ms in 4 buckets ends at 43.75 + 4 * 100
    cm = flat_model(grad_reduce_ms=400.0)
    assert overlapped_step_ms(plan, lengths, cm, reduce_ms=400.0, buckets=4,
                              backward_share=0.75) == pytest.approx(43.75 + 400.0)
    # one bucket hides nothing: it is ready only when the backward ends
    assert overlapped_step_ms(plan, lengths, cm, reduce_ms=400.0, buckets=1, backward_share=0.75) == 500.0
    with pytest.raises(ValueError, match="reduce_ms=500.0 must lie in"):
        overlapped_step_ms(plan, lengths, cm, reduce_ms=500.0, buckets=4, backward_share=0.75)


def test_overlap_never_beats_the_makespan_nor_loses_to_no_overlap():
    cm = flat_model(grad_reduce_ms=300.0)
    rng = np.random.default_rng(1)
    for _ in range(5):
        lengths = rng.integers(10, 400, 30).tolist()
        plan = plan_step(lengths, 8, cm)
        on = overlapped_step_ms(plan, lengths, cm, reduce_ms=150.0, buckets=16, backward_share=0.75)
        off = simulate(plan, lengths, cm)
        assert off - 300.0 + 150.0 < on <= off


@pytest.fixture(scope="module")
def quick_rows():
    return comm_sim.run(comm_sim.QUICK)


def test_quick_run_reports_every_summary_key_as_ratios_of_its_rows(quick_rows):
    summary = comm_sim.summarise(quick_rows)
    for key in ("tokenring_gain_vs_ring_16", "tokenring_gain_vs_ring_16_mha_long", "auto_gain_vs_best_mode_16", "overlap_gain_64",
                "overlap_gain_64_measured_share", "link_aware_gain_two_nic", "link_aware_gain_two_nic_wikipedia"):
        assert key in summary and summary[key] > 0
    tr = [r for r in quick_rows if r["part"] == "tokenring" and r["gpus"] == 16 and r["heads"] == "gqa4"
          and r["workload"].startswith("wikipedia")]
    assert summary["tokenring_gain_vs_ring_16"] == pytest.approx(
        sum(r["ring_ms"] for r in tr) / sum(r["tokenring_ms"] for r in tr), abs=1e-4)
    for r in quick_rows:
        if r["part"] == "overlap":
            assert r["overlap_ms"] <= r["no_overlap_ms"] and r["overlap_measured_share_ms"] <= r["no_overlap_ms"]
        if r["part"] == "links":
            assert r["aware_groups_over_ethernet"] == 0
            assert r["aware_ms"] <= r["oblivious_ms"] * (1 + 1e-9)
    long = [r for r in quick_rows if r["part"] == "links" and r["workload"].startswith("long")]
    # the oblivious planner spans the Ethernet with a long document and believes it cheap
    assert any(r["oblivious_groups_over_ethernet"] for r in long)
    assert all(r["oblivious_believed_ms"] < r["oblivious_ms"] for r in long)
    assert summary["link_aware_gain_two_nic"] > 1.0


def test_multi_head_attention_is_where_tokenring_beats_the_ring(quick_rows):
    long = {(r["heads"], r["gpus"]): r for r in quick_rows if r["part"] == "tokenring"
            and not r["workload"].startswith("wikipedia")}
    assert long[("mha", 16)]["tokenring_ms"] < long[("mha", 16)]["ring_ms"]
    assert long[("gqa4", 16)]["tokenring_ms"] > long[("gqa4", 16)]["ring_ms"]
