"""bench/optim.py's convergence section: the run plan, the paired-gap statistics, and the worker pool.

The statistics decide whether FP8AdamW meets "final loss within 1% of fp32 AdamW", so they are
checked exactly on hand-computed gaps; the pool must give every run the losses it has alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.optim import (FORMATS, FP8_RERUN, OPTIMIZERS, REFERENCE, RERUN, WINDOW, ConvRun, RunResult, TrainSetup,
                         convergence_plan, convergence_rows, convergence_summary, gap_statistics, run_convergence,
                         train_lm)

T_975_2DOF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (any t table)


def test_gap_statistics_match_hand_computed_values():
    stats = gap_statistics([-1.0, 2.0, 5.0])  # mean 2, sample sd 3, stderr 3 / sqrt(3) = sqrt(3)
    assert stats["loss_gap_pct"] == pytest.approx(2.0, abs=1e-12)
    assert stats["loss_gap_pct_stderr"] == pytest.approx(math.sqrt(3.0), rel=1e-12)
    lo, hi = stats["loss_gap_pct_ci95"]
    assert lo == pytest.approx(2.0 - T_975_2DOF * math.sqrt(3.0), rel=1e-9)
    assert hi == pytest.approx(2.0 + T_975_2DOF * math.sqrt(3.0), rel=1e-9)
    assert stats["loss_gap_abs_pct_mean"] == pytest.approx(8.0 / 3.0, rel=1e-12)


def test_gap_statistics_of_one_seed_have_no_interval_and_none_is_an_error():
    assert gap_statistics([0.5]) == {"loss_gap_pct": 0.5, "loss_gap_pct_stderr": None, "loss_gap_pct_ci95": None,
                                     "loss_gap_abs_pct_mean": 0.5}
    with pytest.raises(ValueError, match="no gaps"):
        gap_statistics([])


def test_plan_runs_fp32_and_fp8_on_every_seed_the_rest_on_seed_0():
    plan = convergence_plan(FORMATS, seeds=12, extra_seed_formats=())
    assert len(plan) == 12 * 2 + 4 == len(set(plan))
    assert {r.optimizer for r in plan if r.seed > 0} == {REFERENCE, "FP8AdamW fp8"}
    seed0 = {REFERENCE, RERUN, FP8_RERUN, *(f"FP8AdamW {f}" for f in FORMATS)}
    assert {r.optimizer for r in plan if r.seed == 0} == seed0
    assert len(convergence_plan(FORMATS, seeds=12, extra_seed_formats=("int8",))) == 28 + 11
    assert all(r.optimizer in OPTIMIZERS for r in plan)


def test_summary_pairs_each_seed_with_its_own_reference():
    plan = convergence_plan(("fp8", "int8"), seeds=3, extra_seed_formats=())
    ref = {0: 2.0, 1: 3.0, 2: 4.0}
    final = {(REFERENCE, 0): 2.0, (REFERENCE, 1): 3.0, (REFERENCE, 2): 4.0, (RERUN, 0): 2.01,
             ("FP8AdamW fp8", 0): 2.02, ("FP8AdamW fp8", 1): 2.97, ("FP8AdamW fp8", 2): 4.08,
             ("FP8AdamW int8", 0): 1.98, (FP8_RERUN, 0): 1.99}
    results = {run: RunResult(run, [5.0] * 10 + [final[run.optimizer, run.seed]] * WINDOW, 1.0, "cpu")
               for run in plan}
    summary = convergence_summary(convergence_rows(plan, results), ("fp8", "int8"))
    gaps = [100 * (final["FP8AdamW fp8", s] - ref[s]) / ref[s] for s in range(3)]  # +1, -1, +2 %
    assert summary["loss_gap_pct_per_seed"]["fp8"] == pytest.approx({"0": gaps[0], "1": gaps[1], "2": gaps[2]})
    assert summary["loss_gap_pct"] == pytest.approx(2 / 3)
    assert summary["loss_gap_abs_pct_mean"] == pytest.approx(4 / 3)
    assert summary["fp8_wins"] == 1
    assert summary["loss_gap_pct_by_format"]["int8"] == pytest.approx(-1.0)
    assert summary["fp32_rerun_gap_pct"] == pytest.approx(0.5)
    assert summary["fp8_rerun_gap_pct"] == pytest.approx(abs(-0.5 - 1.0))
    assert summary["fp32_seed_spread_pct"] == pytest.approx(100 * 2.0 / 3.0)
    assert summary["seeds"] == 3


def test_runs_in_spawned_workers_equal_runs_alone():
    model = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    setup = TrainSetup(steps=4, model=model, docs_per_step=2, doc_len=32, device_type="cpu")
    plan = [ConvRun(REFERENCE, 1), ConvRun("FP8AdamW fp8", 1)]
    results = run_convergence(plan, setup, jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in plan:
            alone = train_lm(OPTIMIZERS[run.optimizer], steps=4, model=model, docs_per_step=2, doc_len=32,
                             device=torch.device("cpu"), seed=1)
            assert results[run].losses == alone, run
    finally:
        torch.set_num_threads(threads)
