import json

import numpy as np
import pytest

from seqmesh.scheduler import default_cost_model, lower_bound, plan_step
from seqmesh.scheduler.cost_model import CostModel

EXTERNAL = {"alpha1_ms_per_tok2": 2e-6, "alpha2_ms_per_tok": 0.1, "beta_ms": 25.0,
            "a2a_GBps": {"2": 100.0, "4": 80.0, "16": 40.0}, "comm_bytes_per_token": 3e6,
            "mem_bytes_per_token": 4e5, "mem_static_bytes": 1.8e10, "mem_limit_bytes": 8e10}


def test_external_form_prices_groups_exactly_as_the_issue_formula():
    cm = CostModel.from_dict(EXTERNAL)
    s = [1000, 5000, 20000]
    for d, bw in ((2, 100.0), (4, 80.0), (16, 40.0)):
        want = sum(2e-6 * x * x + 0.1 * x for x in s) / d + 25.0 + sum(s) * 3e6 / d / (bw * 1e6)
        assert cm.group_ms(s, d) == pytest.approx(want, rel=1e-12)
    assert cm.group_ms(s, 1) == pytest.approx(sum(2e-6 * x * x + 0.1 * x for x in s) + 25.0, rel=1e-12)
    # an unlisted size is refused, naming itself, the priced sizes and the fixes
    with pytest.raises(ValueError, match=r"prices all-to-all for group sizes \[2, 4, 16\] .* but not 8;.*"
                                         r"a2a_GBps\[\"8\"\].*extrapolate_bandwidth"):
        cm.bandwidth_GBps(8)
    # ... unless extrapolation is asked for: then the nearest listed size below (8 -> 4, 64 -> 16)
    ext = CostModel.from_dict({**EXTERNAL, "extrapolate_bandwidth": True})
    assert ext.bandwidth_GBps(8) == 80.0 and ext.bandwidth_GBps(64) == 40.0
    assert CostModel.from_json(ext.to_json()) == ext and "extrapolate_bandwidth" not in cm.to_dict()


def test_planner_uses_only_priced_sizes_unless_told_to_extrapolate():
    cm = CostModel.from_dict(EXTERNAL)
    lengths = [60000, 30000] + [2000] * 40
    plan = plan_step(lengths, 32, cm)
    assert set(plan.group_sizes()) <= {1, 2, 4, 16}  # default sizes: the priced powers of two
    with pytest.raises(ValueError, match="but not 8;"):
        plan_step(lengths, 32, cm, group_sizes=[1, 2, 8])
    # a sequence that only a 32-rank group holds: refused, and the message names the way out
    huge = [cm.capacity(16) + 1]
    with pytest.raises(ValueError, match="fits no group.*prices group sizes up to 16.*extrapolate_bandwidth"):
        plan_step(huge, 32, cm)
    ext = CostModel.from_dict({**EXTERNAL, "extrapolate_bandwidth": True})
    assert plan_step(huge, 32, ext).group_sizes() == [32]
    assert plan_step(lengths, 32, ext, group_sizes=[1, 2, 8]).predicted_ms > 0


def test_memory_fit_is_the_issue_inequality_and_capacity_its_largest_solution():
    cm = CostModel.from_dict(EXTERNAL)
    for d in (1, 2, 8):
        cap = cm.capacity(d)
        assert cm.fits(cap, d) and not cm.fits(cap + 1, d)
        assert cm.mem_static_bytes + cm.mem_bytes_per_token * cap / d <= cm.mem_limit_bytes


def test_own_format_round_trips_and_speed_factors_slow_a_group():
    cm = CostModel.from_dict({**EXTERNAL, "speed": [1.0, 0.5, 1.0, 1.0], "grad_reduce_ms": 7.0})
    again = CostModel.from_json(cm.to_json())
    assert again == cm and json.loads(cm.to_json())["format"] == "seqmesh-cost-model/1"
    speed = cm.rank_speed(4)
    assert cm.group_ms([4000], 2, speed[0:2].min()) == pytest.approx(2 * cm.group_ms([4000], 2))
    with pytest.raises(ValueError, match="4 speed factors but the plan has 8 ranks"):
        cm.rank_speed(8)


@pytest.mark.parametrize("change, message", [
    ({"beta_ms": None}, "missing key 'beta_ms'"),
    ({"alpha2_ms_per_tok": "fast"}, "key 'alpha2_ms_per_tok' must be a number"),
    ({"a2a_GBps": [100, 80]}, "key 'a2a_GBps' must be an object"),
    ({"a2a_GBps": {"two": 100}}, "non-integer group size 'two'"),
    ({"mem_limit_bytes": 1e9}, "mem_static_bytes=1.8e\\+10 leaves no room"),
    ({"beta_ms": -1.0}, "beta_ms=-1.0 must be a finite non-negative number"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"format": "other/2"}, "key 'format' is 'other/2'"),
])
def test_bad_json_names_the_key(change, message):
    raw = {**EXTERNAL, **{k: v for k, v in change.items() if v is not None}}
    for k, v in change.items():
        if v is None:
            del raw[k]
    with pytest.raises(ValueError, match=message):
        CostModel.from_dict(raw)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found; try the shipped example .*seqmesh profile"):
        CostModel.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        CostModel.load(bad)


def test_default_cost_model_is_flops_over_rate():
    cm = default_cost_model(params=7e9, hidden_size=4096, num_layers=32, device_flops=500e12,
                            mem_limit_bytes=80e9, dp_shards=8, checkpointing=False)
    assert cm.alpha2_ms_per_tok == pytest.approx(6 * 7e9 / 500e12 * 1e3)
    assert cm.alpha1_ms_per_tok2 == pytest.approx(6 * 4096 * 32 / 500e12 * 1e3)
    assert cm.mem_static_bytes == pytest.approx(16 * 7e9 / 8)
    ckpt = default_cost_model(params=7e9, hidden_size=4096, num_layers=32, device_flops=500e12, mem_limit_bytes=80e9,
                              dp_shards=8)
    assert ckpt.alpha2_ms_per_tok == pytest.approx(cm.alpha2_ms_per_tok * 4 / 3)
    assert ckpt.capacity(1) > cm.capacity(1)  # checkpointing trades time for memory
    with pytest.raises(ValueError, match="device_flops=0"):
        default_cost_model(params=7e9, hidden_size=4096, num_layers=32, device_flops=0, mem_limit_bytes=80e9)
    # ZeRO-3 reducing once per step keeps the rank's full fp32 gradients: 4 bytes per parameter, not 4 / 8.
    whole = default_cost_model(params=7e9, hidden_size=4096, num_layers=32, device_flops=500e12,
                               mem_limit_bytes=80e9, dp_shards=8, checkpointing=False, whole_grads=True)
    assert whole.mem_static_bytes == pytest.approx(12 * 7e9 / 8 + 4 * 7e9)
    with pytest.raises(ValueError, match="whole_grads describes fully sharded states"):
        default_cost_model(params=7e9, hidden_size=4096, num_layers=32, device_flops=500e12, mem_limit_bytes=80e9,
                           zero_stage=1, whole_grads=True)


def test_lower_bound_is_the_issue_definition():
    cm = CostModel.from_dict({**EXTERNAL, "extrapolate_bandwidth": True})  # size 8 priced as 4
    lengths = [300, 2000, 150_000, 400_000]
    gpus = 8
    area = 0.0
    for s in lengths:
        comm = [s * cm.comm_bytes_per_token / (cm.bandwidth_GBps(d) * 1e6) if d > 1 else 0.0
                for d in (1, 2, 4, 8) if cm.fits(s, d)]
        area += 2e-6 * s * s + 0.1 * s + min(comm)
    area += 25.0 * sum(lengths) / ((8e10 - 1.8e10) / 4e5)
    longest = min(cm.group_ms([400_000], d) for d in (1, 2, 4, 8) if cm.fits(400_000, d))
    assert lower_bound(lengths, gpus, cm) == pytest.approx(max(area / gpus, longest), rel=1e-12)


def test_sequence_no_group_holds_is_an_error_naming_length_and_limit():
    cm = CostModel.from_dict({**EXTERNAL, "extrapolate_bandwidth": True})
    too_long = cm.capacity(8) + 1
    for policy in ("adaptive", "static"):
        with pytest.raises(ValueError, match=f"{too_long} tokens.*(holds|memory holds) {cm.capacity(8 if policy == 'adaptive' else 1)}"):
            plan_step([100, too_long], 8, cm, policy=policy)
    with pytest.raises(ValueError, match=f"{too_long} tokens fits no group"):
        lower_bound([too_long], 8, cm)


def test_without_a2a_only_single_rank_groups_are_planned():
    cm = CostModel.from_dict({**EXTERNAL, "a2a_GBps": {}})
    plan = plan_step(list(np.full(16, 1000)), 4, cm)
    assert set(plan.group_sizes()) == {1}
    with pytest.raises(ValueError, match="need a2a_GBps"):
        plan_step([1000], 4, cm, group_sizes=[2, 4])
