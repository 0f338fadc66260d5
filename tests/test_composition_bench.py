"""bench/composition.py's arithmetic: post-warmup throughput means and the per-layout cost model."""

from __future__ import annotations

import pytest

from bench.composition import layout_cost_model, measured
from seqmesh.scheduler.cost_model import CostModel


def test_means_are_totals_over_time_after_warmup() -> None:
    records = [{"step_time_s": 10.0, "tokens": 100, "flops": 1e15},  # warm-up, left out
               {"step_time_s": 2.0, "tokens": 100, "flops": 4e14},
               {"step_time_s": 6.0, "tokens": 300, "flops": 1.2e15, "plan_predicted_ms": 5000.0}]
    out = measured({"records": records, "num_devices": 2, "peak_flops_per_device": 1e14, "peak_mem_bytes": 2**31},
                   warmup=1)
    assert out["tokens_per_s"] == pytest.approx(400 / 8.0) and out["tokens_per_s_per_device"] == pytest.approx(25.0)
    assert out["mfu"] == pytest.approx(1.6e15 / 2 / 8.0 / 1e14)  # FLOPs over time, per device, over the peak
    assert out["step_s"] == pytest.approx(4.0) and out["steps_measured"] == 2 and out["peak_mem_gb"] == 2.0
    assert measured({"records": records, "num_devices": 1, "peak_flops_per_device": None}, 1)["mfu"] is None


def test_layout_cost_model_shards_states_and_applies_the_layout() -> None:
    profile = CostModel(alpha1_ms_per_tok2=1e-7, alpha2_ms_per_tok=0.01, beta_ms=4.0, a2a_GBps={2: 100.0},
                        comm_bytes_per_token=1e6, mem_bytes_per_token=2e5, mem_static_bytes=16 * 1e9,
                        mem_limit_bytes=1e11)
    zero1 = layout_cost_model(profile, tp=1, pp=1, hdp=2, zero_stage=1, moment_bytes=8.0)
    assert zero1.static_bytes == pytest.approx((4 + 4 + 4) * 1e9)
    tp2 = layout_cost_model(profile, tp=2, pp=1, hdp=1, zero_stage=0, moment_bytes=2.0)  # FP8 moments
    assert (tp2.tp, tp2.tp_GBps) == (2, 100.0) and tp2.static_bytes == pytest.approx(10 * 1e9 / 2)
    assert layout_cost_model(profile, tp=1, pp=2, hdp=1, zero_stage=0, moment_bytes=8.0).group_ms([1000], 1) == \
        pytest.approx(profile.group_ms([1000], 1) / 2)
