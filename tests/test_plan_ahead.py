"""The plan-ahead side process: a refitted cost model reaches the step already being planned."""

from __future__ import annotations

import functools

from seqmesh.scheduler import CostModel, plan_step
from seqmesh.scheduler.plan import Plan
from seqmesh.trainer.plan_ahead import PlanAhead


def _model(alpha2: float) -> CostModel:
    return CostModel(alpha1_ms_per_tok2=1e-6, alpha2_ms_per_tok=alpha2, beta_ms=5.0, a2a_GBps={2: 50.0},
                     comm_bytes_per_token=1e4, mem_bytes_per_token=1e4, mem_static_bytes=1e8,
                     mem_limit_bytes=1e10)


def test_replacing_the_plan_fn_replans_the_prefetched_step():
    lengths = [900, 300, 4000, 1200, 50]
    old, new = _model(0.01), _model(0.05)
    planner = PlanAhead(functools.partial(plan_step, gpus=2, cost_model=old), rank=0)
    try:
        planner.prefetch(1, lengths)
        planner.replace_plan_fn(functools.partial(planner.plan_fn, cost_model=new))
        key, future = planner._pending[1]
        text, _ = future.result(timeout=120)
        assert key == tuple(lengths)
        assert Plan.from_json(text).predicted_ms == plan_step(lengths, 2, new).predicted_ms
        assert plan_step(lengths, 2, new).predicted_ms != plan_step(lengths, 2, old).predicted_ms
        assert planner.plan_fn.keywords["cost_model"] is new
    finally:
        planner.close()
