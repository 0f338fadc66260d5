"""CostFeedback: group times and the tail read the way the simulator prices them; warm-up and steps with
one-off work are never fitted; refits from a step loop's own timings predict its step times."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from seqmesh.scheduler import CostModel, plan_step, simulate
from seqmesh.scheduler.plan import plan_from_assignment
from seqmesh.trainer.cost_feedback import CostFeedback

PROFILE = CostModel(alpha1_ms_per_tok2=4e-7, alpha2_ms_per_tok=0.03, beta_ms=40.0, a2a_GBps={2: 100.0},
                    comm_bytes_per_token=4e5, mem_bytes_per_token=2.5e5, mem_static_bytes=2e10,
                    mem_limit_bytes=3.4e10)
# The machine the loop "runs" on: the profile's proportions are off, not only its level.
MACHINE = dataclasses.replace(PROFILE, alpha1_ms_per_tok2=5.2e-7, alpha2_ms_per_tok=0.0345, beta_ms=80.0,
                              a2a_GBps={2: 70.0})
TAIL_MS = 400.0


def _plan(mbs):
    plan = plan_from_assignment(2, mbs)
    return dataclasses.replace(plan, predicted_ms=simulate(plan, LENGTHS, PROFILE))


LENGTHS = [2000, 3000, 40000, 1000]


def test_group_time_is_the_shortest_span_and_the_tail_what_the_simulated_makespan_leaves():
    # Rank 1 runs the SP=2 group first, then its own: spans pair with the plan's order of each rank's work.
    plan = _plan([[(0, 2, [2])], [(0, 1, [0, 3]), (1, 1, [1])]])
    fb = CostFeedback(PROFILE, refine_every=0, warmup_steps=0)
    # Rank 0 reached the SP=2 group 50 ms after rank 1 (rank 1's span holds that wait); the group took 900 ms.
    out = fb.observe_step(plan, LENGTHS, [(0, [900.0, 120.0]), (1, [950.0, 200.0])], step_ms=1600.0)
    assert out["fit"] and out["plan_model"] == 0
    assert [g[:6] for g in out["groups"]] == [[0, 0, 2, 1, 40000, 900.0], [1, 0, 1, 2, 3000, 120.0],
                                              [1, 1, 1, 1, 3000, 200.0]]
    assert [g[6] for g in out["groups"]] == [round(PROFILE.group_ms([40000], 2), 2),
                                              round(PROFILE.group_ms([2000, 1000], 1), 2),
                                              round(PROFILE.group_ms([3000], 1), 2)]
    assert out["makespan_ms"] == 1100.0 and out["tail_ms"] == 500.0
    assert list(fb.groups) == [((40000,), 2, 900.0), ((2000, 1000), 1, 120.0), ((3000,), 1, 200.0)]
    assert list(fb.tails) == [500.0]
    with pytest.raises(ValueError, match="HDP rank 1 timed 1 groups but the plan gives it 2"):
        fb.observe_step(plan, LENGTHS, [(0, [900.0, 120.0]), (1, [950.0])], step_ms=1600.0)


def test_slow_ranks_are_fitted_at_nominal_speed():
    slow = dataclasses.replace(PROFILE, speed=(1.0, 0.5))
    plan = plan_from_assignment(2, [[(0, 1, [0]), (1, 1, [1])]])
    plan = dataclasses.replace(plan, predicted_ms=simulate(plan, LENGTHS, slow))
    out = CostFeedback(slow, 0, warmup_steps=0).observe_step(plan, LENGTHS, [(0, [100.0]), (1, [400.0])], 500.0)
    assert out["groups"][1][6] == round(slow.group_ms([3000], 1) / 0.5, 2)  # predicted at the rank's pace
    assert out["makespan_ms"] == 400.0 and out["tail_ms"] == 100.0


def test_warmup_steps_are_reported_but_never_fitted():
    plan = _plan([[(0, 1, [0, 3]), (1, 1, [1])], [(0, 2, [2])]])
    spans = [(0, [100.0, 900.0]), (1, [150.0, 900.0])]
    fb = CostFeedback(PROFILE, refine_every=1, warmup_steps=1)
    first = fb.observe_step(plan, LENGTHS, [(0, [5000.0, 9000.0]), (1, [5000.0, 9000.0])], 30000.0)
    assert first["fit"] is False and first["tail_ms"] == 16000.0
    assert fb.maybe_refine(0) is None and not fb.groups and not fb.tails
    assert fb.observe_step(plan, LENGTHS, spans, 1400.0)["fit"]
    refit = fb.maybe_refine(1)
    assert refit is not None and refit.grad_reduce_ms == pytest.approx(1400.0 - 1050.0)
    # The first step's 16 s tail and ~10x groups left no trace in the refit.
    assert refit.group_ms([40000], 2) == pytest.approx(900.0, rel=0.05)


def test_the_model_that_priced_a_plan_is_found_among_the_kept_generations():
    fb = CostFeedback(PROFILE, refine_every=1, warmup_steps=0)
    old = _plan([[(0, 2, [2])], [(0, 1, [0, 3]), (1, 1, [1])]])
    fb.observe_step(old, LENGTHS, [(0, [1200.0, 300.0]), (1, [1200.0, 300.0])], 2000.0)
    new_model = fb.maybe_refine(0)
    assert new_model is not None and fb.refits == 1
    new = dataclasses.replace(old, predicted_ms=simulate(old, LENGTHS, new_model))
    assert fb.observe_step(old, LENGTHS, [(0, [1200.0, 300.0]), (1, [1200.0, 300.0])], 2000.0)["plan_model"] == 0
    out = fb.observe_step(new, LENGTHS, [(0, [1200.0, 300.0]), (1, [1200.0, 300.0])], 2000.0)
    assert out["plan_model"] == 1 and out["predicted_tail_ms"] == round(new_model.grad_reduce_ms, 2)
    stranger = dataclasses.replace(old, predicted_ms=123.0)
    assert fb.observe_step(stranger, LENGTHS, None, 2000.0) == {"plan_model": None, "one_off": {},
                                                                "predicted_tail_ms": round(new_model.grad_reduce_ms, 2)}


def test_a_step_with_one_off_work_is_reported_but_not_fitted_and_the_next_clean_one_is():
    plan = _plan([[(0, 1, [0, 3]), (1, 1, [1])], [(0, 2, [2])]])
    fb = CostFeedback(PROFILE, refine_every=1, warmup_steps=1)
    fb.observe_step(plan, LENGTHS, [(0, [5000.0, 9000.0]), (1, [5000.0, 9000.0])], 30000.0)  # warm-up
    # A later step that built two cuDNN graphs on one rank and a process group on both: 1.7x slow groups.
    slow = fb.observe_step(plan, LENGTHS, [(0, [170.0, 1530.0]), (1, [255.0, 1530.0])], 2400.0,
                           one_off={"cudnn_graph": 2, "process_group": 2, "compile": 0})
    assert slow["fit"] is False and slow["one_off"] == {"cudnn_graph": 2, "process_group": 2}
    assert slow["makespan_ms"] == 1785.0 and slow["tail_ms"] == 615.0  # still measured and reported
    assert fb.maybe_refine(1) is None and not fb.groups and not fb.tails
    clean = fb.observe_step(plan, LENGTHS, [(0, [100.0, 900.0]), (1, [150.0, 900.0])], 1400.0, one_off={})
    assert clean["fit"] and clean["one_off"] == {}
    assert list(fb.tails) == [1400.0 - 1050.0] and len(fb.groups) == 3
    refit = fb.maybe_refine(2)
    assert refit is not None and refit.grad_reduce_ms == pytest.approx(350.0)
    assert refit.group_ms([40000], 2) == pytest.approx(900.0, rel=0.05)  # the 1530 ms one-off group left no trace


def _closed_loop(feedback: CostFeedback, policy: str, steps: int = 9, noise: float = 0.01) -> list[tuple[int, float]]:
    """The step loop in miniature: plans a step ahead, runs them on MACHINE with timing noise (the first
    step pays 3x group times and a 5x tail), feeds the timings back; (pricing model, relative error) per step."""
    rng = np.random.default_rng(0)
    planning_model, errors = feedback.cost_model, []
    for step in range(steps):
        lengths = [int(x) for x in np.clip(rng.lognormal(np.log(3000), 1.0, 12), 128, 30000)]
        lengths[0] = int(rng.integers(45000, 60000))  # needs an SP=2 group
        plan = plan_step(lengths, 2, planning_model, policy=policy, sp=2 if policy == "static" else 1)
        planning_model = feedback.cost_model  # the next step's plan is made before this step's refit
        warm = 3.0 if step == 0 else 1.0
        free, spans = np.zeros(2), ([], [])
        for mb in plan.microbatches:
            for g in mb.groups:
                ms = MACHINE.group_ms([lengths[s] for s in g.sequences], g.count) * warm * (1 + noise * rng.normal())
                start = free[g.first:g.first + g.count].max()
                for r in g.ranks:
                    spans[r].append(start + ms - free[r])
                free[g.first:g.first + g.count] = start + ms
        measured = free.max() + TAIL_MS * (5.0 if step == 0 else 1.0) * (1 + noise * rng.normal())
        out = feedback.observe_step(plan, lengths, [(0, spans[0]), (1, spans[1])], measured)
        errors.append((out["plan_model"], abs(plan.predicted_ms - measured) / measured))
        feedback.maybe_refine(step)
    return errors


@pytest.mark.parametrize("policy", ["adaptive", "static"])
def test_refits_predict_the_step_time_within_two_percent(policy):
    errors = _closed_loop(CostFeedback(PROFILE, refine_every=2), policy)
    refitted = [e for gen, e in errors if gen]
    assert len(refitted) >= 5 and np.mean(refitted) < 0.02
    assert np.mean([e for gen, e in errors[1:] if gen == 0]) > 0.1  # the profile alone (no tail) is far off
    # Fitting the warm-up step too (what the loop did before) leaves the refits far less accurate.
    naive = [e for gen, e in _closed_loop(CostFeedback(PROFILE, refine_every=2, warmup_steps=0), policy) if gen]
    assert np.mean(naive) > 2 * np.mean(refitted)
