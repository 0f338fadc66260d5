"""bench/scheduler_gpu.py's arithmetic: per-step rows, and the cost-model error over refit-priced steps only
(steady ones for the goal's figure, every one beside it)."""

from __future__ import annotations

import pytest

from bench.scheduler_gpu import policy_row, step_rows, summarize


def _record(step: int, predicted: float, measured: float, refits: int, warmup: bool = False, **feedback) -> dict:
    rec = {"step": step, "tokens": 9000, "plan_predicted_ms": predicted, "step_time_s": measured / 1e3,
           "warmup": warmup, "plan_error": abs(predicted - measured) / measured, "cost_model_refits": refits,
           "plan_group_sizes": [1, 2], "plan_microbatches": 2}
    if feedback:
        rec["cost_feedback"] = feedback
    return rec


def _result(records: list[dict]) -> dict:
    return {"records": records, "mean_tokens_per_s": 100.0, "mean_mfu": 0.2, "peak_mem_bytes": 2**31}


def test_error_counts_only_steps_a_refitted_model_priced():
    group = [[0, 0, 2, 3, 9000, 900.0, 1000.0]]
    recs = [_record(1, 500.0, 4000.0, 0, warmup=True, plan_model=0, fit=False, groups=group),  # warm-up: 87% off
            _record(2, 800.0, 1000.0, 1, plan_model=0, fit=True, tail_ms=100.0, groups=group),
            _record(3, 900.0, 1000.0, 1, plan_model=0, fit=True, groups=group),  # planned before the refit
            _record(4, 1020.0, 1000.0, 2, plan_model=1, fit=True, groups=[[0, 0, 2, 3, 9000, 900.0, 918.0]]),
            _record(5, 990.0, 1000.0, 2, plan_model=2, fit=True, groups=[[0, 0, 2, 3, 9000, 900.0, 891.0]])]
    row = policy_row("adaptive", _result(recs))
    assert row["plan_error_after_refit"] == pytest.approx(0.015)
    assert row["plan_error_first_steps"] == pytest.approx(0.15)
    assert row["group_error_after_refit"] == pytest.approx(0.015)
    assert row["steps_after_refit"] == 2 and row["step_s_mean"] == pytest.approx(1.0)
    steps = row["steps"]
    assert [s["refit"] for s in steps] == [False, True, False, True, False]
    assert steps[1] == {"step": 2, "tokens": 9000, "microbatches": 2, "predicted_ms": 800.0, "measured_ms": 1000.0,
                        "error": 0.2, "plan_model": 0, "warmup": False, "refit": True, "fit": True, "tail_ms": 100.0,
                        "groups": group}
    assert summarize([{"policy": "static-sp=2", "tokens_per_s": 80.0}, row]) == {
        "speedup_vs_best_static": pytest.approx(1.25), "cost_model_error": row["plan_error_after_refit"],
        "cost_model_error_all": row["plan_error_after_refit_all"], "one_off_steps": 0}


def test_steps_with_one_off_work_are_left_out_of_the_error_but_counted():
    group = [[0, 0, 2, 3, 9000, 900.0, 1000.0]]
    recs = [_record(1, 500.0, 4000.0, 0, warmup=True, plan_model=0, fit=False, one_off={"cudnn_graph": 8}),
            _record(2, 800.0, 1000.0, 1, plan_model=0, fit=False, one_off={"cudnn_graph": 2}),
            _record(3, 1000.0, 1000.0, 1, plan_model=0, fit=True, one_off={}),
            _record(4, 1500.0, 1000.0, 2, plan_model=1, fit=False, one_off={"cudnn_graph": 1, "compile": 1},
                    groups=group),  # a new bucket: 50% off
            _record(5, 1020.0, 1000.0, 2, plan_model=1, fit=True, one_off={},
                    groups=[[0, 0, 2, 3, 9000, 900.0, 918.0]]),
            _record(6, 970.0, 1000.0, 3, plan_model=2, fit=True, one_off={},
                    groups=[[0, 0, 2, 3, 9000, 900.0, 873.0]])]
    row = policy_row("adaptive", _result(recs))
    assert row["plan_error_after_refit"] == pytest.approx(0.025)  # steps 5 and 6
    assert row["plan_error_after_refit_all"] == pytest.approx((0.5 + 0.02 + 0.03) / 3, abs=1e-4)  # rounded
    assert row["group_error_after_refit"] == pytest.approx(0.025)  # step 4's group left out too
    assert row["one_off_steps"] == 2 and row["steps_after_refit"] == 2  # steps 2 and 4; warm-up not counted
    assert [s["one_off"] for s in row["steps"][:2]] == [{"cudnn_graph": 8}, {"cudnn_graph": 2}]
    summary = summarize([{"policy": "static-sp=2", "tokens_per_s": 80.0}, row])
    assert summary["cost_model_error"] == row["plan_error_after_refit"] and summary["one_off_steps"] == 2
    assert summary["cost_model_error_all"] == row["plan_error_after_refit_all"]


def test_without_loop_diagnostics_the_pricing_model_is_the_one_before_the_prefetch():
    # Refits after steps 2 and 4; step 3's plan was made during step 2, before its refit, so step 4 is the
    # first one a refitted model priced.
    recs = [_record(1, 1.0, 2.0, 0, warmup=True), _record(2, 1.0, 2.0, 1), _record(3, 1.0, 2.0, 1),
            _record(4, 1.0, 2.0, 2), _record(5, 1.0, 2.0, 2), _record(6, 1.0, 2.0, 2)]
    assert [s["plan_model"] for s in step_rows(recs)] == [0, 0, 0, 1, 1, 2]
    assert "groups" not in step_rows(recs)[0]
