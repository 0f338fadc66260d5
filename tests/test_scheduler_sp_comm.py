"""The planner's cost terms for Ulysses, zigzag ring and TokenRing, derived from their volumes."""

import dataclasses

import numpy as np
import pytest

from seqmesh.scheduler import Plan, check_plan, plan_step, simulate
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.links import parse_cluster
from seqmesh.scheduler.sp_comm import AttentionComm, step_rates

HQ, D, LAYERS, B = 8, 64, 4, 2


def model(mode: str, kv_heads: int, alpha1: float = 0.0, p2p: float = 50.0) -> CostModel:
    attn = AttentionComm(mode=mode, q_heads=HQ, kv_heads=kv_heads, head_dim=D, layers=LAYERS, act_bytes=B,
                         forward_passes=2, p2p_GBps={2: p2p, 4: p2p, 8: p2p})
    return CostModel(alpha1_ms_per_tok2=alpha1, alpha2_ms_per_tok=0.01, beta_ms=1.0, a2a_GBps={2: p2p, 4: p2p, 8: p2p},
                     comm_bytes_per_token=4 * HQ * D * B * 3 * LAYERS, mem_bytes_per_token=1e5, mem_static_bytes=1e9,
                     mem_limit_bytes=8e9, attention=attn)


def comm_only(cm: CostModel, s: float, d: int) -> float:
    return float(cm.seq_ms(s, d)) - (cm.alpha1_ms_per_tok2 * s * s + cm.alpha2_ms_per_tok * s) / d


@pytest.mark.parametrize("kv_heads", [HQ, HQ // 4])
@pytest.mark.parametrize("d", [2, 4, 8])
def test_without_attention_to_hide_behind_every_byte_is_paid(kv_heads, d):
    """alpha1 = 0: nothing overlaps, so the exposed time is the tables' volumes over the bandwidth."""
    s, bw, x = 8192.0, 50e9, 8192.0 / d
    ring = comm_only(model("ring", kv_heads), s, d)
    kv = 2 * kv_heads * D * LAYERS
    ring_bytes = 2 * (d - 1) * kv * B + (d - 1) * kv * (B + 4) + kv * B  # 2 forwards, backward, last dK/dV hop
    assert ring == pytest.approx(x * ring_bytes / bw * 1e3, rel=1e-12)
    tr = comm_only(model("tokenring", kv_heads), s, d)
    q, lse = HQ * D * LAYERS * B, 4 * HQ * LAYERS
    fwd = (d - 1) * q + (d - 1) * (q + lse)          # queries at steps 1..d-1, results at steps 2..d, one port
    bwd = (d - 1) * (3 * q + lse) + (d - 1) * q
    assert tr == pytest.approx(x * (2 * fwd + bwd) / bw * 1e3, rel=1e-12)
    if kv_heads == HQ:
        assert tr < ring   # multi-head: TokenRing moves fewer bytes (the backward's fp32 dK/dV stay home)
    else:
        assert tr > 2 * ring  # GQA 4: K/V are a quarter of q; the ring wins


def test_long_sequences_hide_the_ring_behind_attention():
    cm = model("ring", HQ, alpha1=1e-6)
    s, d = 65536.0, 4
    assert comm_only(cm, s, d) == pytest.approx((s / d) * 2 * HQ * D * LAYERS * B / 50e9 * 1e3, rel=1e-9)  # last hop
    # short: each transfer pays what its step's attention (w * alpha1 * s^2 / d^2) does not hide
    s, x, bw, kv = 512.0, 128.0, 50e6, 2 * HQ * D * LAYERS
    a_fwd, a_bwd = 1e-6 * s * s / 16 / 4, 2e-6 * s * s / 16 / 4  # shares 1/4 and 2/4 of alpha1
    want = 2 * 3 * max(0.0, x * kv * B / bw - a_fwd) + 3 * max(0.0, x * kv * (B + 4) / bw - a_bwd) + x * kv * B / bw
    assert comm_only(cm, s, d) == pytest.approx(want, rel=1e-9)
    assert 0 < want < comm_only(model("ring", HQ), s, d)


def test_tokenring_uses_separate_ports_when_its_peers_sit_behind_different_links():
    """Two nodes of two GPUs: at step 2 of 4 the result goes to the other node while the queries
    stay on the node (NVLink): the two transfers run in parallel, not one after the other."""
    links = parse_cluster("format: seqmesh-cluster/1\ngpus_per_node: 2\nbandwidth_GBps: {nvlink: 100, infiniband: 10}\n"
                          "nodes:\n  - {name: n, nic: infiniband, count: 2}\n")
    cm = dataclasses.replace(model("tokenring", HQ), links=links)
    block = cm.block(0, 4)
    fwd = AttentionComm(**{**dataclasses.asdict(cm.attention), "p2p_GBps": {}}).passes()[0]
    rates, final = step_rates(cm.attention, fwd, 4, block)
    # step 1: queries only, r -> r-1 crosses nodes for ranks 0 and 2: the InfiniBand port carries them
    assert rates[0] == pytest.approx(fwd.send / 10 / 1e6)
    # step 2: queries one position back, results one on: every rank sends one of them over NVLink and
    # the other over InfiniBand (rank 0: queries to 3, result to 1), so they overlap instead of adding
    assert rates[1] == pytest.approx(max(fwd.send, fwd.result) / 10 / 1e6)
    assert rates[1] < (fwd.send + fwd.result) / 10 / 1e6
    assert final == 0.0 and len(rates) == 4


def test_modes_price_plans_from_the_same_inputs_and_round_trip():
    rng = np.random.default_rng(0)
    lengths = rng.integers(500, 30000, 20).tolist()
    times = {}
    for mode in ("ulysses", "ring", "tokenring"):
        cm = model(mode, HQ // 4, alpha1=2e-7)
        plan = plan_step(lengths, 8, cm)
        check_plan(plan, lengths, cm)
        times[mode] = simulate(plan, lengths, cm)
        assert plan.predicted_ms == pytest.approx(times[mode])
        assert CostModel.from_json(cm.to_json()) == cm
    assert len(set(times.values())) == 3


def test_ring_modes_without_bandwidth_or_shapes_say_what_to_add():
    with pytest.raises(ValueError, match=r"attention.q_heads=0 must be an integer >= 1 for the ring modes"):
        AttentionComm(mode="tokenring")
    with pytest.raises(ValueError, match="attention mode 'rings'; choose one of ulysses, ring, tokenring"):
        AttentionComm(mode="rings")
    cm = model("ring", HQ)
    cm = dataclasses.replace(cm, attention=dataclasses.replace(cm.attention, p2p_GBps={2: 50.0}))
    assert not cm.priced(4)
    with pytest.raises(ValueError, match=r'add attention.p2p_GBps\["4"\].*or give a cluster file'):
        cm.seq_ms(1000.0, 4)
    raw = model("ring", HQ).to_dict()
    raw["attention"]["heads"] = 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'heads' in 'attention'"):
        CostModel.from_dict(raw)


def test_the_planner_picks_each_groups_mode_and_the_plan_names_it():
    """``attention.choose``: every group is priced at its fastest mode and the plan records it, so the
    trainer runs exactly what the simulator priced; Ulysses is never chosen wider than the heads."""
    cm = model("ulysses", HQ, alpha1=2e-7)
    auto = dataclasses.replace(cm, attention=dataclasses.replace(cm.attention, choose=("ulysses", "ring",
                                                                                        "tokenring")))
    assert auto.modes(8) == ("ulysses", "ring", "tokenring") and auto.modes(1) == ("ulysses",)
    narrow = dataclasses.replace(auto, attention=dataclasses.replace(auto.attention, q_heads=4, kv_heads=2))
    assert narrow.modes(8) == ("ring", "tokenring")  # 8 ranks, 4 heads: no Ulysses
    rng = np.random.default_rng(3)
    lengths = [40000, 30000] + rng.integers(300, 6000, 30).tolist()
    plan = plan_step(lengths, 8, auto)
    check_plan(plan, lengths, auto)
    wide = [g for mb in plan.microbatches for g in mb.groups if g.count > 1]
    assert wide and all(g.mode == auto.best_mode([lengths[s] for s in g.sequences], g.count, g.first) for g in wide)
    assert all(not g.mode for mb in plan.microbatches for g in mb.groups if g.count == 1)
    assert plan.predicted_ms == pytest.approx(simulate(plan, lengths, auto))
    assert Plan.from_json(plan.to_json()) == plan
    # each single mode prices this plan's groups no faster than the chosen modes
    for mode in ("ulysses", "ring", "tokenring"):
        forced = dataclasses.replace(plan, microbatches=tuple(
            dataclasses.replace(mb, groups=tuple(dataclasses.replace(g, mode=mode if g.count > 1 else "")
                                                 for g in mb.groups)) for mb in plan.microbatches))
        assert simulate(forced, lengths, auto) >= plan.predicted_ms * (1 - 1e-12)
    bad = dataclasses.replace(plan, microbatches=tuple(
        dataclasses.replace(mb, groups=tuple(dataclasses.replace(g, mode="ulysses" if g.count > 1 else "")
                                             for g in mb.groups)) for mb in plan.microbatches))
    with pytest.raises(ValueError, match=r"runs SP mode 'ulysses'; the cost model allows \['ring', 'tokenring'\]"):
        check_plan(bad, lengths, narrow)
