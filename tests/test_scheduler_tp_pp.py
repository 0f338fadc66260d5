"""The cost model and planners under a TP x PP layout (the mesh is PP x HDP x TP; plans cover HDP)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from seqmesh.scheduler import check_plan, lower_bound, plan_step, simulate
from seqmesh.scheduler.cli import plan_main
from seqmesh.scheduler.cost_model import CostModel
from seqmesh.scheduler.fitting import refine
from seqmesh.scheduler.greedy import heuristic, pipeline_finish
from seqmesh.scheduler.instance import Instance
from seqmesh.scheduler.milp import solve_milp
from seqmesh.scheduler.plan import Plan, plan_from_assignment
from seqmesh.scheduler.static import best_static, static_plan


def model(beta: float = 20.0, cap_tokens: int = 4000, grad_reduce_ms: float = 0.0) -> CostModel:
    """A profile of one device: one rank holds ``cap_tokens`` tokens, SP costs real communication."""
    return CostModel(alpha1_ms_per_tok2=2e-4, alpha2_ms_per_tok=0.5, beta_ms=beta,
                     a2a_GBps={2: 2.0, 4: 1.5, 8: 1.0}, comm_bytes_per_token=2e5,
                     mem_bytes_per_token=1e5, mem_static_bytes=1e8, mem_limit_bytes=1e8 + 1e5 * cap_tokens,
                     grad_reduce_ms=grad_reduce_ms)


def aligned(plan: Plan) -> bool:
    """Every rank's micro-batches sit at consecutive positions (what the pipelined trainer runs well)."""
    for r in range(plan.gpus):
        positions = [k for k, _ in plan.work_of(r)]
        if positions and positions != list(range(positions[0], positions[-1] + 1)):
            return False
    return True


# ---- the cost model ----------------------------------------------------------------------------

def test_tp_divides_compute_memory_and_prices_its_collectives():
    cm = model()
    tp2 = cm.with_layout(tp=2, tp_GBps=0.0)
    for s, d in ((1000, 1), (3000, 2), (8000, 4)):
        assert tp2.seq_ms(s, d) == pytest.approx(cm.seq_ms(s, d) / 2)  # compute and Ulysses traffic halve
    # model states halve; activations by 3/4 (the gathered GEMM inputs stay whole on each TP rank)
    assert tp2.static_bytes == cm.mem_static_bytes / 2 and tp2.act_bytes_per_token == cm.mem_bytes_per_token * 0.75
    assert tp2.capacity(1) == int((tp2.mem_limit_bytes - 0.5e8) / 0.75e5)
    assert tp2.capacity(1) > cm.capacity(1) / 0.75
    # TP's all-gathers/reduce-scatters: comm_bytes_per_token * (tp-1)/tp per token of the rank's share
    priced = cm.with_layout(tp=2, tp_GBps=4.0)
    extra = 3000 / 2 * 2e5 * 0.5 / (4.0 * 1e6)
    assert priced.seq_ms(3000, 2) == pytest.approx(tp2.seq_ms(3000, 2) + extra)
    # without a given bandwidth the profile's all-to-all on the TP group's ranks stands for it
    assert cm.with_layout(tp=2).tp_GBps == 2.0 and cm.with_layout(tp=4).tp_GBps == 1.5
    assert cm.with_layout(tp=1, pp=2).tp_GBps == 0.0


def test_pp_divides_time_and_model_states_but_not_a_micro_batch_capacity():
    cm = model(beta=20.0, cap_tokens=4000)
    pp2 = cm.with_layout(pp=2)
    assert pp2.group_ms([1000, 500], 2) == pytest.approx(cm.group_ms([1000, 500], 2) / 2)
    assert pp2.microbatch_ms == 10.0 and pp2.static_bytes == cm.mem_static_bytes / 2
    # 1/pp of the layers' activations per stage, but pp micro-batches in flight on the first stage
    assert pp2.act_bytes_per_token == cm.mem_bytes_per_token
    assert pp2.capacity(1) == int((pp2.mem_limit_bytes - 0.5e8) / 1e5)
    both = cm.with_layout(tp=2, pp=2, tp_GBps=0.0)
    assert both.static_bytes == cm.mem_static_bytes / 4
    assert both.seq_ms(5000, 2) == pytest.approx(cm.seq_ms(5000, 2) / 4)


def test_pipelined_step_is_the_1f1b_makespan():
    cm = model(beta=0.0).with_layout(pp=4)
    t = cm.group_ms([1000], 1)
    one_rank = plan_from_assignment(1, [[(0, 1, [k])] for k in range(6)])
    assert simulate(one_rank, [1000] * 6, cm) == pytest.approx((6 + 4 - 1) * t)  # (m + pp - 1) x stage time
    # unequal items: their sum plus the fill and drain of the largest
    lengths = [3000, 1000, 2000]
    items = [cm.group_ms([n], 1) for n in lengths]
    plan = plan_from_assignment(1, [[(0, 1, [k])] for k in range(3)])
    assert simulate(plan, lengths, cm) == pytest.approx(sum(items) + 3 * max(items))
    # one item alone crosses all stages: the whole model's time, no gain from the pipeline
    assert simulate(plan_from_assignment(1, [[(0, 1, [0])]]), [3000], cm) == pytest.approx(model(0.0).seq_ms(3000, 1))


def test_aligned_positions_an_idle_position_drains_the_pipeline():
    cm = model(beta=0.0).with_layout(pp=2)
    t = cm.group_ms([1000], 1)
    # rank 1 runs items at positions 0 and 2, idle at 1: two runs, each with its own fill and drain
    plan = plan_from_assignment(2, [[(0, 1, [0]), (1, 1, [1])], [(0, 1, [2])], [(0, 1, [3]), (1, 1, [4])]])
    lengths = [1000] * 5
    assert simulate(plan, lengths, cm) == pytest.approx(4 * t)   # rank 1: (1 + 1) t + (1 + 1) t
    packed = plan_from_assignment(2, [[(0, 1, [0]), (1, 1, [1])], [(0, 1, [2]), (1, 1, [4])], [(0, 1, [3])]])
    assert simulate(packed, lengths, cm) == pytest.approx(4 * t)  # rank 0: (3 + 1) t, rank 1: (2 + 1) t
    assert aligned(packed) and not aligned(plan)


def test_per_device_speed_factors_become_per_hdp_rank():
    # world of 8 = pp 2 x hdp 2 x tp 2; HDP rank 1 holds devices 2, 3, 6, 7
    cm = model().with_speed([1.0, 0.9, 1.0, 1.0, 0.8, 1.0, 1.0, 0.7])
    assert cm.with_layout(tp=2, pp=2).speed == (0.8, 0.7)
    assert cm.with_layout(tp=4).speed == (0.9, 0.7)
    assert model().with_speed([1.0, 0.5]).with_layout(tp=1).speed == (1.0, 0.5)


def test_layout_in_json_and_for_layout():
    cm = model().with_layout(tp=2, pp=4, tp_GBps=3.0)
    raw = cm.to_dict()
    assert (raw["tp"], raw["pp"], raw["tp_GBps"]) == (2, 4, 3.0)
    assert CostModel.from_json(cm.to_json()) == cm
    assert not {"tp", "pp", "tp_GBps"} & set(model().to_dict())  # the one-device form is unchanged
    assert model().for_layout(2, 4) == model().with_layout(2, 4)
    assert cm.for_layout(2, 4) is cm
    with pytest.raises(ValueError, match="made for tp=2, pp=4"):
        cm.for_layout(1, 2)
    with pytest.raises(ValueError, match="'pp' must be an integer >= 1"):
        CostModel.from_dict({**model().to_dict(), "pp": 0})
    with pytest.raises(ValueError, match="per device over tp x pp"):  # 2.5e9 / 4 > the 5e8 limit
        CostModel.from_dict({**model().to_dict(), "mem_static_bytes": 2.5e9, "tp": 2, "pp": 2})
    assert CostModel.from_dict({**model().to_dict(), "mem_static_bytes": 2.5e9, "tp": 4, "pp": 2}).capacity(1) > 0


def test_refine_under_tp_and_pp_recovers_the_whole_model_coefficients():
    truth = CostModel(alpha1_ms_per_tok2=3e-6, alpha2_ms_per_tok=0.02, beta_ms=8.0, a2a_GBps={2: 50.0},
                      comm_bytes_per_token=1e6, mem_bytes_per_token=1e5, mem_static_bytes=1e9,
                      mem_limit_bytes=8e10).with_layout(tp=2, pp=2, tp_GBps=0.0)
    rng = np.random.default_rng(0)
    obs = []
    for _ in range(24):
        d = int(rng.choice([1, 2]))
        lens = [int(x) for x in rng.integers(500, 9000, int(rng.integers(1, 4)))]
        obs.append((lens, d, truth.group_ms(lens, d)))
    start = CostModel.from_dict({**truth.to_dict(), "alpha1_ms_per_tok2": 1e-7, "alpha2_ms_per_tok": 1.0,
                                 "beta_ms": 0.0, "tp_GBps": 7.0})
    fitted = refine(start, obs)
    assert (fitted.tp, fitted.pp, fitted.tp_GBps) == (2, 2, 0.0)
    assert fitted.alpha1_ms_per_tok2 == pytest.approx(3e-6, rel=1e-4)
    assert fitted.alpha2_ms_per_tok == pytest.approx(0.02, rel=1e-4)
    assert fitted.beta_ms == pytest.approx(8.0, rel=1e-4)
    assert fitted.bandwidth_GBps(2) == pytest.approx(50.0, rel=1e-4)


# ---- planners at pp = 2 ------------------------------------------------------------------------

@pytest.mark.parametrize("gpus,n,beta,seed", [(2, 9, 0.0, 0), (4, 20, 20.0, 1), (8, 40, 20.0, 2), (8, 60, 0.0, 3),
                                              (16, 80, 5.0, 4)])
def test_pp2_plans_are_valid_aligned_and_priced_by_the_simulator(gpus, n, beta, seed):
    cm = model(beta=beta, cap_tokens=4000, grad_reduce_ms=7.0).with_layout(tp=2, pp=2)
    lengths = [int(x) for x in np.random.default_rng(seed).integers(30, 9000, n)]
    plan = plan_step(lengths, gpus, cm)
    check_plan(plan, lengths, cm)
    assert aligned(plan)
    ms = simulate(plan, lengths, cm)
    assert plan.predicted_ms == pytest.approx(ms, rel=1e-9)
    assert lower_bound(lengths, gpus, cm) <= ms * (1 + 1e-9)
    assert plan_step(lengths, gpus, cm).digest() == plan.digest()
    # the heuristic's own objective is the simulator's makespan
    inst = Instance.build(lengths, gpus, cm)
    sched, objective = heuristic(inst, plan.lower_bound_ms - cm.grad_reduce_ms)
    assert objective == pytest.approx(simulate(inst.to_plan(sched), lengths, cm) - 7.0, rel=1e-9)
    static = best_static(lengths, gpus, cm)
    check_plan(static, lengths, cm)
    assert aligned(static) and plan.predicted_ms <= static.predicted_ms * (1 + 1e-9)


def test_pp_plans_more_micro_batches_where_the_drain_outweighs_beta():
    lengths = [900] * 16
    flat = model(beta=0.0)
    singles = (8 + 4 - 1) * flat.seq_ms(900, 1) / 4  # 8 micro-batches of one sequence per rank
    for policy in ("adaptive", "static"):
        one = plan_step(lengths, 2, flat, policy=policy)
        piped = plan_step(lengths, 2, flat.with_layout(pp=4), policy=policy)
        assert len(one.microbatches) == 2  # fullest: 4 sequences of 900 per 4000-token micro-batch
        assert len(piped.microbatches) >= 8  # the fill and drain shrink, beta is free
        assert piped.predicted_ms <= singles * (1 + 1e-9)
    assert static_plan(lengths, 2, 1, flat.with_layout(pp=4)).predicted_ms == pytest.approx(singles)
    # when a micro-batch's beta costs more than the drain it saves, the pipeline keeps them full
    costly = model(beta=2000.0).with_layout(pp=4)
    assert len(plan_step(lengths, 2, costly).microbatches) == 2
    assert len(static_plan(lengths, 2, 1, costly).microbatches) == 2


def _partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


def brute_force_pp(lengths: list[int], cm: CostModel) -> float:
    """Best pipelined makespan on 2 HDP ranks over every block assignment and micro-batch split."""
    blocks = [(0, 1), (1, 1), (0, 2)]
    best = np.inf
    for assign in itertools.product(blocks, repeat=len(lengths)):
        loads, peaks = {}, {}
        for blk in blocks:
            mine = [i for i, a in enumerate(assign) if a == blk]
            options = [(sum(items), max(items, default=0.0)) for part in _partitions(mine)
                       if all(cm.fits(sum(lengths[i] for i in b), blk[1]) for b in part)
                       for items in [[cm.group_ms([lengths[i] for i in b], blk[1]) for b in part]]]
            if not options:
                break
            loads[blk], peaks[blk] = zip(*options)
        else:
            for k0, k1, k2 in itertools.product(*(range(len(loads[b])) for b in blocks)):
                wide, wpeak = loads[(0, 2)][k2], peaks[(0, 2)][k2]
                fin = [wide + loads[(r, 1)][k] + (cm.pp - 1) * max(wpeak, peaks[(r, 1)][k])
                       for r, k in ((0, k0), (1, k1))]
                best = min(best, max(fin))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_exact_milp_under_pp_equals_brute_force(seed):
    cm = model(beta=[0.0, 20.0, 300.0][seed], cap_tokens=1500).with_layout(pp=2)
    lengths = [int(x) for x in np.random.default_rng(seed).integers(50, 1500, 4)]
    inst = Instance.build(lengths, 2, cm)
    found = solve_milp(inst, None, time_limit_s=60.0)
    assert found is not None and found[1] == "Optimal"
    assert pipeline_finish(inst, found[0]).max() == pytest.approx(brute_force_pp(lengths, cm), rel=1e-6)
    assert simulate(inst.to_plan(found[0]), lengths, cm) == pytest.approx(pipeline_finish(inst, found[0]).max())
    heuristic_ms = plan_step(lengths, 2, cm).predicted_ms
    assert heuristic_ms <= 1.1 * brute_force_pp(lengths, cm)


# ---- pp = tp = 1 is the model of before --------------------------------------------------------

def test_pp_tp_1_plans_are_unchanged():
    """Figures of the planner before TP/PP accounting existed (same inputs, same digests, same ms).

    The adaptive digests changed once since, on purpose: a block's micro-batches now run shortest
    first (``Instance.to_plan``), which leaves every rank's finish as it was (the last ms digit of
    the 8-GPU case moved by summation order) and lets the gradient reduction hide behind longer
    last backwards."""
    cm = CostModel(alpha1_ms_per_tok2=2e-4, alpha2_ms_per_tok=0.5, beta_ms=20.0,
                   a2a_GBps={2: 2.0, 4: 1.5, 8: 1.0}, comm_bytes_per_token=2e5,
                   mem_bytes_per_token=1e5, mem_static_bytes=1e8, mem_limit_bytes=1e8 + 1e5 * 4000, grad_reduce_ms=5.0)
    assert cm.with_layout(1, 1) == cm
    cases = [(2, [3000, 120, 800, 2500, 60, 4000, 1500],
              (6466.6, "277c72bfbe015921", 6445.75, 6466.6, "1b3a74124b76ecfb")),
             (8, [int(x) for x in np.random.default_rng(3).integers(20, 9000, 40)],
              (37672.7451, "a48c56ca69185caf", 37381.75630000001, 38589.83505000001, "7ea4d010b0e5840a"))]
    for gpus, lengths, expected in cases:
        plan, static = plan_step(lengths, gpus, cm), best_static(lengths, gpus, cm)
        assert (plan.predicted_ms, plan.digest(), lower_bound(lengths, gpus, cm), static.predicted_ms,
                static.digest()) == expected


# ---- callers: `seqmesh plan` and the trainer's cost model ------------------------------------

def test_plan_cli_takes_the_layout(tmp_path, capsys):
    (tmp_path / "lengths.txt").write_text("\n".join(str(300 + 97 * i % 3500) for i in range(32)) + "\n")
    (tmp_path / "cost.json").write_text(model(beta=2.0).to_json())
    base = ["--lengths", str(tmp_path / "lengths.txt"), "--gpus", "2", "--global-batch", "32",
            "--cost-model", str(tmp_path / "cost.json"), "--out", str(tmp_path / "p.jsonl")]
    ms = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        assert plan_main(base + ["--tp", str(tp), "--pp", str(pp)]) == 0
        ms[tp, pp] = json.loads(capsys.readouterr().out)["predicted_ms"]
        plan = Plan.from_json((tmp_path / "p.jsonl").read_text())
        check_plan(plan, [300 + 97 * i % 3500 for i in range(32)], model(beta=2.0).with_layout(tp, pp))
    assert ms[2, 1] < ms[1, 1] and ms[1, 2] < ms[1, 1]
    (tmp_path / "cost.json").write_text(model().with_layout(tp=2).to_json())
    assert plan_main(base + ["--pp", "2"]) == 2
    assert "made for tp=2, pp=1" in capsys.readouterr().err


def test_trainer_cost_model_applies_the_layout_and_zero():
    from seqmesh.trainer.build import build_model
    from tests.conftest import cost_model_of
    from seqmesh.trainer.config import config_from_dict

    def cfg(tp: int, pp: int, zero: int):
        return config_from_dict({"parallel": {"tp": tp, "pp": pp, "zero_stage": zero},
                                 "launch": {"num_workers": 4 * tp * pp}})

    torch.manual_seed(0)
    net = build_model(cfg(1, 1, 0).model, 300, torch.device("cpu"))
    params = net.num_params(exclude_embeddings=True)
    flat = cost_model_of(cfg(1, 1, 0), net, torch.device("cpu"))
    assert (flat.tp, flat.pp) == (1, 1) and flat.mem_static_bytes == 16.0 * params
    piped = cost_model_of(cfg(1, 2, 1), net, torch.device("cpu"))  # a pipeline rank holding this many
    assert piped.pp == 2 and piped.tp_GBps == 0.0
    assert piped.static_bytes == pytest.approx((4 + 4 + 8 / 4) * params)  # ZeRO-1 shards moments over 4 HDP ranks
    # tp x pp times this rank's weights stand for the whole model; attention counts the whole model's layers
    assert piped.alpha2_ms_per_tok == pytest.approx(2 * flat.alpha2_ms_per_tok)
    assert piped.alpha1_ms_per_tok2 == flat.alpha1_ms_per_tok2


def test_planner_memory_leaves_the_configured_headroom(tmp_path):
    from seqmesh.trainer.build import build_model
    from tests.conftest import cost_model_of
    from seqmesh.trainer.config import ConfigError, config_from_dict

    (tmp_path / "cost.json").write_text(model().to_json())
    torch.manual_seed(0)
    net = build_model(config_from_dict({}).model, 300, torch.device("cpu"))
    limits = {}
    for headroom in (0.0, 0.25):
        run = config_from_dict({"scheduler": {"cost_model": str(tmp_path / "cost.json")},
                                "memory": {"limit_gb": 8.0, "headroom": headroom}})
        limits[headroom] = cost_model_of(run, net, torch.device("cpu")).mem_limit_bytes
    assert limits == {0.0: 8 * 2**30, 0.25: 6 * 2**30}
    with pytest.raises(ConfigError, match="memory.headroom"):
        config_from_dict({"memory": {"headroom": 1.0}})
