"""Per-rank step-time breakdown and speed factors: a slowed rank is found, and the factors, fed to the
scheduler's cost model, move work away from it."""

from __future__ import annotations

import random

import pytest

from seqmesh.launch.stragglers import mean_breakdown, speed_factors, step_breakdown, stragglers, with_measured_speed
from seqmesh.scheduler import default_cost_model, plan_step

SPEED = [1.0, 1.0, 0.5, 1.0]  # rank 2 runs at half speed
SCALE = 3.0                   # the cost model's absolute error: measured = SCALE x predicted at nominal speed
REDUCE_S = 0.010


def _records(steps: int = 6) -> list[dict]:
    """metrics.jsonl records as the loop logs them, from a known truth."""
    rng = random.Random(0)
    records = []
    for step in range(1, steps + 1):
        predicted = [rng.uniform(50, 150) for _ in SPEED]
        compute = [SCALE * p / s / 1e3 for p, s in zip(predicted, SPEED)]
        wait = [0.002 * (r + 1) for r in range(len(SPEED))]
        arrival = [w + c for w, c in zip(wait, compute)]
        reduce = [REDUCE_S + max(arrival) - a for a in arrival]  # the collective waits for the slowest rank
        records.append({"step": step, "warmup": step == 1, "rank_predicted_ms": predicted,
                        "rank_timings": {"compute_s": compute, "reduce_s": reduce, "optimizer_s": [0.004] * 4,
                                         "plan_wait_s": wait}})
    return records


def test_breakdown_separates_waiting_in_the_reduction_from_the_reduction() -> None:
    record = _records(1)[0]
    parts = step_breakdown(record)
    assert list(parts) == ["compute", "plan_wait", "grad_reduce", "optimizer", "idle"]
    assert parts["grad_reduce"] == pytest.approx([REDUCE_S] * 4)
    slowest = max(range(4), key=lambda r: record["rank_timings"]["compute_s"][r] + record["rank_timings"]["plan_wait_s"][r])
    assert parts["idle"][slowest] == 0
    totals = [sum(parts[k][r] for k in parts) for r in range(4)]
    assert totals == pytest.approx([totals[0]] * 4)  # every rank spends the same wall time per step
    assert step_breakdown({"step": 1}) == {}


def test_mean_breakdown_leaves_out_warmup() -> None:
    records = _records()
    mean = mean_breakdown(records)
    manual = sum(r["rank_timings"]["compute_s"][2] for r in records[1:]) / (len(records) - 1)
    assert mean["compute"][2] == pytest.approx(manual)


def test_speed_factors_find_the_slow_rank_whatever_the_cost_models_scale() -> None:
    factors = speed_factors(_records())
    assert factors == pytest.approx(SPEED)
    assert stragglers(factors) == [2]


def test_speed_factors_need_per_rank_predictions() -> None:
    with pytest.raises(ValueError, match="rank_predicted_ms"):
        speed_factors([{"step": 1, "loss": 1.0}])


def test_measured_speed_moves_work_away_from_the_straggler() -> None:
    cm = default_cost_model(params=5e6, hidden_size=256, num_layers=6, device_flops=1e12, mem_limit_bytes=8 * 2**30)
    measured = with_measured_speed(cm, _records())
    assert measured.speed == pytest.approx(SPEED)
    lengths = [random.Random(1).randint(64, 2048) for _ in range(32)]

    def work(model) -> list[float]:
        plan = plan_step(lengths, 4, model, policy="adaptive", time_limit_s=0.5)
        return [sum(cm.group_ms([lengths[s] for s in g.sequences], g.count) for _, g in plan.work_of(r))
                for r in range(4)]

    before, after = work(cm), work(measured)
    others = [after[r] for r in (0, 1, 3)]
    assert after[2] < 0.75 * min(others), (before, after)
    assert after[2] < before[2]
